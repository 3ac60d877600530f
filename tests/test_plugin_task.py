"""The plug-in contract, end to end: a task and its dataset defined in THIS file (not in the
package; registered only while the test runs) go through synth -> pack (2 encoder processes)
-> verify -> the streaming ingest -> one epoch of the real trainer on the embedded Ray with 2
workers -> the test split, with nothing in ``data_pipeline`` or ``avmoe/train`` knowing them.
It is the worked example of docs/adding-a-task.md; if the contract rots, this breaks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avmoe.config import OptimConfig, TaskConfig, apply_overrides, tiny_adapter, tiny_audio, tiny_visual
from avmoe.tasks import TASKS, MetricAccumulator, Task, get_task, register_task
from data_pipeline.datasets import DATASETS, Dataset
from data_pipeline.datasets.base import RawSample, SplitListing, require_file, unique_keys
from data_pipeline.sample import LabelError, label_field
from data_pipeline.schema import sanitize_key
from data_pipeline.synthetic import render_clip, save_clip, segment_audio, split_sizes

# ----------------------------------------------------------------------------- the dataset


class ClipClassDataset(Dataset):
    """One class per 2-s clip. Raw layout: ``{split}.csv`` lines ``<id>,<class name>``,
    ``classes.txt``, ``frames/<id>/*.jpg``, ``wave/<id>.npy`` (32 kHz)."""

    name, task, segments, demo_size, synth_max_classes = "clipclass", "clipclass", 2, 8, 3

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        classes = open(require_file(os.path.join(src, "classes.txt"), "class list")).read().split()
        path = require_file(os.path.join(src, f"{split}.csv"), f"clipclass {split} list")
        samples = []
        for line in open(path).read().split():
            vid, cls = line.split(",")
            s = RawSample(key=sanitize_key(vid), labels={"video_id": vid, "class": classes.index(cls)})
            self.frames_and_wave(s, src, vid, os.path.join(src, "frames", vid),
                                 os.path.join(src, "wave", vid + ".npy"), from_videos, videos_dir)
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": classes})

    def spec_extra(self, manifest):
        return {"num_classes": len(manifest["label_vocab"]["classes"])}

    def target_shapes(self, spec):
        return {"label": ((), np.dtype(np.int64))}

    def target_encoder(self, spec):
        def fill(labels, out, i):
            c = int(label_field(labels, "class"))
            if not 0 <= c < spec.extra["num_classes"]:
                raise LabelError("class", f"class {c} outside 0..{spec.extra['num_classes'] - 1}")
            out["label"][i] = c

        return fill

    def synth(self, out, n, rng, num_classes, size, videos):
        names = [f"c{k}" for k in range(num_classes)]
        with open(os.path.join(out, "classes.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        for split, count in split_sizes(n).items():
            rows = []
            for i in range(count):
                vid, c = f"{split}{i:03d}", i % num_classes
                frames = render_clip(rng, size, 3, self.segments, lambda t: [(c, num_classes, None)])
                wave = segment_audio(rng, self.segments, [[(c, num_classes)]] * self.segments)
                save_clip(frames, wave, False, "", os.path.join(out, "frames", vid),
                          os.path.join(out, "wave", vid + ".npy"), 1)
                rows.append(f"{vid},{names[c]}")
            with open(os.path.join(out, f"{split}.csv"), "w") as f:
                f.write("\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- the model


@dataclass
class ClipClassConfig(TaskConfig):
    num_classes: int = 3
    hidden: int = 16


class ClipClassHead(nn.Module):
    """Mean over time of [visual ; audio] token means -> MLP -> class logits."""

    def __init__(self, cfg: ClipClassConfig, trunk: nn.Module):
        super().__init__()
        d = trunk.visual_specs[-1].dim + trunk.audio_specs[-1].dim
        self.mlp = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.num_classes))

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        b, t = inputs.batch_size, inputs.num_segments
        x = torch.cat([feats.v_feat, feats.a_feat], -1).view(b, t, -1).mean(1)
        return {"logits": self.mlp(x)}


# ----------------------------------------------------------------------------- the task


class AccuracyAccumulator(MetricAccumulator):
    def reset(self) -> None:
        self.correct = self.total = 0

    def update(self, preds: dict[str, Any], batch) -> None:
        y = batch.targets["label"].reshape(-1)
        self.correct += int((preds["label"].reshape(-1) == y).sum())
        self.total += len(y)

    def compute(self) -> dict[str, float]:
        return {"acc": self.correct / self.total if self.total else float("nan")}


class ClipClassTask(Task):
    head = ClipClassHead
    primary_metric = "acc"
    demo_schedule = dict(epochs=1, batch_size=2, grad_accum=1, lr=1e-3, scheduler="none")

    def make_preset(self, preset):
        cfg = ClipClassConfig(visual=tiny_visual(), audio=tiny_audio(), num_segments=2)
        return apply_overrides(cfg, {"adapter": tiny_adapter(num_skip=2)})

    def training_defaults(self, preset):
        return OptimConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, scheduler="none", epochs=2,
                           batch_size=2, grad_accum=1, seed=5)

    def model_keys(self, manifest):
        return {**super().model_keys(manifest), "num_classes": len(manifest["label_vocab"]["classes"])}

    def example_targets(self, cfg, batch_size, generator):
        return {"label": torch.randint(0, cfg.num_classes, (batch_size,), generator=generator)}

    def loss(self, out, batch, cfg):
        parts = {"ce": F.cross_entropy(out["logits"], batch.targets["label"].to(out["logits"].device))}
        return self.add_load_balance(parts["ce"], parts, out, cfg), self._floats(parts)

    def predict(self, out, batch):
        return {"label": out["logits"].detach().argmax(-1).cpu()}

    def metric_accumulator(self, cfg):
        return AccuracyAccumulator()


@pytest.fixture
def plugin():
    """Registered here for the duration of the test only (other tests loop over the registries)."""
    DATASETS.add(ClipClassDataset.name, ClipClassDataset())
    register_task("clipclass")(ClipClassTask)  # in a plug-in module: @register_task("clipclass")
    try:
        yield get_task("clipclass")
    finally:
        TASKS.remove("clipclass")
        DATASETS.remove(ClipClassDataset.name)


def test_a_task_and_dataset_from_a_test_module_train_on_ray(plugin, tmp_path, ray_local):
    from avmoe.train import TrainConfig, fit, prepare
    from data_pipeline.pack import PackOptions, pack
    from data_pipeline.synth import synth
    from data_pipeline.verify import verify

    assert plugin.dataset == "clipclass"
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    synth(plugin.dataset, 8, str(raw), seed=1, size=32)
    for split in ("train", "val", "test"):
        pack(plugin.dataset, str(raw), split, str(shards), PackOptions(frame_size=32), workers=2, progress=False)
    assert verify(str(shards)).splits == {"test": 2, "train": 8, "val": 2}

    # the model runs on a batch the task describes, before any data is involved
    cfg = plugin.config("tiny")
    batch = plugin.example_batch(cfg, batch_size=2)
    assert plugin.build_model(cfg)(batch)["logits"].shape == (2, 3)

    tcfg = TrainConfig.of(task="clipclass", data=str(shards), storage=str(tmp_path / "runs"), name="plug",
                          workers=2, cpus_per_worker=0.5, decode_cpus=0.5, epochs=1, shuffle_buffer=8,
                          metrics_address="127.0.0.1", metrics_port=0, plots=False)
    tcfg = prepare(tcfg)
    assert tcfg.model["num_classes"] == 3 and tcfg.model["num_segments"] == 2  # from the manifest
    r = fit(tcfg, prepared=True)
    assert r["task"] == "clipclass" and r["world_size"] == 2
    assert [h["step"] for h in r["history"]] == [2]  # 8 samples / (batch 2 x 2 workers)
    assert set(r["test"]) == {"acc"} and 0.0 <= r["test"]["acc"] <= 1.0
    assert r["optim"]["seed"] == 5  # the task's own training defaults
    saved = json.load(open(tmp_path / "runs" / "plug" / "results.json"))
    assert saved["history"][0]["val"]["acc"] == r["history"][0]["val"]["acc"]
