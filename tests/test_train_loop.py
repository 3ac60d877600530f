"""The trainer without Ray: ``run_local`` (one process, world size 1) of a ``Trainer`` whose
``make_stream`` seam returns an in-memory stand-in for ``ShardStream`` (its members the trainer
uses: manifest, num_samples, batches_per_epoch, epoch/resume/state, skipped_total), built from
hand-made AVBatches. Fast checks of step accounting, gradient accumulation, the per-epoch
StepLR, checkpoint contents and an exact mid-epoch resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import make_batch  # noqa: E402

from avmoe.train import Trainer, TrainConfig, run_local  # noqa: E402
from avmoe.train import checkpoint as ckpt_io  # noqa: E402
from avmoe.train.evaluate import EvalResult  # noqa: E402
from avmoe.train.trainer import NO_SCORE  # noqa: E402

N_TRAIN, N_EVAL = 8, 4


class MemoryStream:
    """Deterministic in-memory stream: sample i of a split is make_batch(seed=i) (batch 1)."""

    def __init__(self, split: str, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        from avmoe.tasks import get_task

        self.task = "ave"
        self.cfg = get_task("ave").config("tiny", num_segments=4)
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.num_samples = N_TRAIN if split == "train" else N_EVAL
        self.keys = [f"{split}{i}" for i in range(self.num_samples)]
        self.manifest = {"dataset": "ave", "shards": [{"keys": self.keys}]}
        self.skipped_total = 0
        self.drop_last = drop_last

    @property
    def batches_per_epoch(self) -> int:
        n = self.num_samples // self.batch_size
        return n if self.drop_last else -(-self.num_samples // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(self.num_samples))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100 + epoch)
            idx = torch.randperm(self.num_samples, generator=g).tolist()
        return idx

    def epoch(self, epoch: int, start_batch: int = 0):
        order = self._order(epoch)
        for b in range(start_batch, self.batches_per_epoch):
            ids = order[b * self.batch_size:(b + 1) * self.batch_size]
            parts = [make_batch("ave", self.cfg, batch_size=1, seed=1000 * (self.split == "train") + i,
                                frame_hw=(16, 16)) for i in ids]
            batch = parts[0]
            for p in parts[1:]:
                batch.frames = torch.cat([batch.frames, p.frames])
                batch.audio = torch.cat([batch.audio, p.audio])
                batch.targets = {k: torch.cat([batch.targets[k], p.targets[k]]) for k in batch.targets}
            batch.keys = [self.keys[i] for i in ids]
            yield batch

    def resume(self, state: dict):
        return self.epoch(state["epoch"], start_batch=state["batches_consumed"])

    def state(self, epoch: int, batches_consumed: int) -> dict:
        return {"epoch": epoch, "batches_consumed": batches_consumed, "rank": 0, "world_size": 1}


class MemoryTrainer(Trainer):
    def make_stream(self, split, batch_size, shuffle, drop_last):
        return MemoryStream(split, batch_size, shuffle, self.seed, drop_last)


def config(tmp_path, name: str, **kw) -> TrainConfig:
    cfg = TrainConfig.of(task="ave", data="memory", storage=str(tmp_path), name=name, workers=1, epochs=2,
                         batch_size=2, grad_accum=2, lr=1e-3, metrics=False, plots=False, model={"num_segments": 4})
    return cfg.apply(kw).validate()


def run(cfg):
    return run_local(cfg, trainer_cls=MemoryTrainer)


def test_steps_accumulation_schedule_and_checkpoint_contents(tmp_path):
    # 8 samples / batch 2 = 4 micro-batches = 2 optimiser steps per epoch; StepLR(1 epoch, 0.5)
    r = run(config(tmp_path, "acc", scheduler="step", step_size=1, gamma=0.5))
    assert [h["step"] for h in r["history"]] == [2, 4]
    assert [h["lr"] for h in r["history"]] == [5e-4, 2.5e-4]  # decayed once per epoch
    assert set(r["test"]) == {"acc"} and r["best"]["epoch"] in (0, 1)
    ck = os.path.join(tmp_path, "acc", "epoch-0002-step-0000004")
    meta = json.load(open(os.path.join(ck, "trainer.json")))
    assert meta["trainer"]["epoch"] == 2 and meta["meta"]["zero_stage"] == 0
    rank0 = json.load(open(os.path.join(ck, "rank-0.json")))
    assert rank0["ingest"] == {"epoch": 2, "batches_consumed": 0, "rank": 0, "world_size": 1}
    assert len(rank0["rng"]["torch"]) > 100  # the RNG is in the checkpoint, as JSON


def test_mid_epoch_resume_in_process_is_exact(tmp_path):
    full = run(config(tmp_path, "full", test=False))
    run(config(tmp_path, "part", test=False, max_steps=3))  # stops inside epoch 1
    assert os.path.isdir(os.path.join(tmp_path, "part", "epoch-0001-step-0000003"))
    part = run(config(tmp_path, "part", test=False))  # same name: resumes
    assert part["history"][-1]["step"] == full["history"][-1]["step"] == 4
    a = ckpt_io.trainable_state(os.path.join(tmp_path, "full", "epoch-0002-step-0000004"))
    b = ckpt_io.trainable_state(os.path.join(tmp_path, "part", "epoch-0002-step-0000004"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed epoch's train loss (and its parts) covers its steps before the stop too
    assert part["history"] == full["history"]
    carried = json.load(open(os.path.join(tmp_path, "part", "epoch-0001-step-0000003", "trainer.json")))
    loss = carried["trainer"]["epoch_loss"]
    assert loss["world_size"] == 1 and loss["per_rank"][0][1] == 2  # 2 micro-batches of epoch 1 so far
    assert set(loss["parts"]) == set(full["history"][1]["train_parts"])


@pytest.mark.parametrize("scores", [
    [0.5, 0.7, 0.7, 0.7, 0.7],  # plateau
    [0.3, float("nan"), 0.3, 0.9, 0.2, 0.9, 0.9, 0.1],
    [float("nan"), float("nan")],
])
def test_the_best_is_the_checkpoint_ray_ranks_first(scores):
    """The trainer's best and Ray Train's retention order agree, ties included: Ray's own
    insertion (ray.train._internal.checkpoint_manager, what CheckpointConfig(num_to_keep,
    checkpoint_score_attribute, "max") keeps the top of) puts the trainer's best at the top
    after every epoch (mid-epoch checkpoints, scored NO_SCORE, interleaved)."""
    from ray.train._internal.checkpoint_manager import _insert_into_sorted_list

    class Result:  # what Ray orders: a reported result (its checkpoint, its score)
        def __init__(self, name, score):
            self.checkpoint, self.score = name, score

    ranked, index, best, best_name = [], {}, None, None
    for epoch, score in enumerate(scores):
        for name, reported in ((f"mid{epoch}", NO_SCORE), (f"epoch{epoch}", NO_SCORE if math.isnan(score) else score)):
            index[name] = len(index)
            _insert_into_sorted_list(ranked, Result(name, reported), key=lambda r: (not math.isnan(r.score), r.score),
                                     checkpoint_to_report_index=index)
        if ckpt_io.is_new_best(score, best):
            best, best_name = score, f"epoch{epoch}"
        if best_name is not None:
            assert ranked[-1].checkpoint == best_name, (epoch, [r.checkpoint for r in ranked])
    if all(math.isnan(x) for x in scores):
        assert best_name is None


class ScriptedValidation(MemoryTrainer):
    """Validation scores 0.7 then 0.5: the best is epoch 0, not the last checkpoint."""

    def validate(self, stream=None, drop=None):
        if stream is not None:
            return super().validate(stream, drop)
        return EvalResult({"acc": (0.7, 0.5)[self.state.epoch]}, [], 0)


class LosesItsBest(ScriptedValidation):
    def finish(self):
        shutil.rmtree(os.path.join(self.session.root, self.state.best_checkpoint))  # storage lost it
        super().finish()


def test_a_finished_run_without_its_best_checkpoint_still_writes_its_results(tmp_path):
    kept = run_local(config(tmp_path, "kept"), trainer_cls=ScriptedValidation)
    assert kept["best"]["checkpoint"] == "epoch-0001-step-0000002" == kept["test_checkpoint"]
    assert "test_fallback" not in kept
    r = run_local(config(tmp_path, "lost"), trainer_cls=LosesItsBest)
    assert r["best"]["checkpoint"] == "epoch-0001-step-0000002"
    assert r["test_checkpoint"] == "epoch-0002-step-0000004" and set(r["test"]) == {"acc"}
    assert "epoch-0001-step-0000002 could not be read" in r["test_fallback"]
    assert "final weights (epoch-0002-step-0000004)" in r["test_fallback"]
    from avmoe.train.cli import format_results

    assert f"note: {r['test_fallback']}" in format_results(r)  # the job's printout says so too
