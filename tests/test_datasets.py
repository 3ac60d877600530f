"""The dataset registry (data_pipeline.datasets): discovery, lookup errors, unregistering; every
registered dataset synthesises, packs and verifies; a dataset defined outside the package (a
plug-in registered only in this process) packs in worker processes and streams through Ray
Data decode tasks, because the generic code hands the Dataset object over instead of
looking it up by name there."""

from __future__ import annotations

import json
import os
import pkgutil
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import data_pipeline.datasets as datasets_pkg
from data_pipeline.datasets import DATASETS, Dataset, get_dataset, list_datasets
from data_pipeline.datasets.base import RawSample, SplitListing, require_file, unique_keys
from data_pipeline.errors import DataPipelineError, LayoutError, UnknownDatasetError
from data_pipeline.media import load_npy, npy_bytes
from data_pipeline.pack import PackOptions, pack
from data_pipeline.registry import Registry
from data_pipeline.sample import LabelError, SampleSpec, label_field, npy_member
from data_pipeline.schema import sanitize_key
from data_pipeline.synthetic import render_clip, save_clip, segment_audio, split_sizes
from data_pipeline.verify import verify

BUILTIN = {"ave", "avvp", "avs-s4", "avs-ms3", "avqa"}


def test_every_module_registers_and_names_match():
    assert BUILTIN <= set(list_datasets()) and list_datasets() == sorted(list_datasets())
    modules = {m.name for m in pkgutil.iter_modules(datasets_pkg.__path__)} - {"base"}
    owners = {type(get_dataset(n)).__module__.rsplit(".", 1)[-1] for n in list_datasets()}
    assert modules <= owners  # every dataset module was imported and registers something
    for name in list_datasets():
        ds = get_dataset(name)
        assert isinstance(ds, Dataset) and ds.name == name
        assert ds.task and ds.segments > 0 and ds.demo_size > 0 and ds.synth_max_classes > 0
        assert ds.audio_samples == ds.segments * 32000


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownDatasetError) as ei:
        get_dataset("kazoo")
    e = ei.value
    assert isinstance(e, KeyError) and isinstance(e, DataPipelineError)
    assert str(e).startswith("unknown dataset 'kazoo'; expected one of ")
    assert all(n in str(e) for n in BUILTIN)
    with pytest.raises(DataPipelineError, match="unknown dataset 'kazoo'"):
        pack("kazoo", ".", "train", "unused", progress=False)


def test_registry_remove():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    reg.add("b", 2)
    assert reg.remove("a") == 1 and reg.names() == ["b"] and "a" not in reg
    with pytest.raises(KeyError, match="unknown thing 'a'; known: b"):
        reg.remove("a")
    reg.add("a", 3)  # a removed name can be registered again
    assert reg.get("a") == 3


def test_entry_point_plugins_are_registered(monkeypatch):
    ep = EntryPoint(name="toy-ep", value=f"{__name__}:ToyEntryPoint", group="data_pipeline.datasets")
    monkeypatch.setattr(datasets_pkg, "entry_points", lambda group: [ep] if
                        group == "data_pipeline.datasets" else [])
    try:
        datasets_pkg._discover()  # the built-in modules are already imported: a no-op for them
        assert isinstance(get_dataset("toy-ep"), ToyEntryPoint)
    finally:
        DATASETS.remove("toy-ep")
    assert "toy-ep" not in list_datasets()


# ------------------------------------------------------------------ every registered dataset
@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_synthesises_packs_and_verifies(synth_root, tmp_path, name):
    ds = get_dataset(name)
    out = tmp_path / "shards"
    opts = PackOptions(frame_size=32, mask_size=32, shard_samples=4)
    for split in ds.splits:
        m = pack(name, str(synth_root / name), split, str(out), opts, progress=False).manifest
        assert (m["dataset"], m["task"], m["segments"]) == (name, ds.task, ds.segments)
        assert m["num_samples"] > 0 and m["num_skipped"] == 0
        spec = SampleSpec.from_manifest(m)
        assert SampleSpec(**json.loads(json.dumps(spec.to_dict()))) == spec
        assert ds.target_shapes(spec)
    assert verify(str(out)).splits.keys() == set(ds.splits)


# ------------------------------------------------------------------ a plug-in dataset
TOY_DIM = 4


class ToyDataset(Dataset):
    """Two 1-s segments, a class per clip and a 4-vector member: ``{split}.txt`` lines
    ``<id>,<class>``; ``frames/<id>/*.jpg``, ``wave/<id>.npy``, ``vec/<id>.npy``."""

    name, task, segments, demo_size, synth_max_classes = "toy-plugin", "toy", 2, 4, 3

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        path = require_file(os.path.join(src, f"{split}.txt"), f"toy {split} list")
        samples = []
        for line in open(path).read().split():
            vid, cls = line.split(",")
            s = RawSample(key=sanitize_key(vid), labels={"video_id": vid, "cls": int(cls)})
            self.frames_and_wave(s, src, vid, os.path.join(src, "frames", vid),
                                 os.path.join(src, "wave", vid + ".npy"), from_videos, videos_dir)
            s.extra["vec"] = os.path.join(src, "vec", vid + ".npy")
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": self.synth_max_classes})

    def extra_members(self, labels):
        return ["vec.npy"]

    def encode_extra(self, sample, opts):
        return [("vec.npy", npy_bytes(load_npy(sample.extra["vec"], sample.key, "vector")))]

    def spec_extra(self, manifest):
        return {"num_classes": manifest["label_vocab"]["classes"]}

    def target_shapes(self, spec):
        return {"cls": ((), np.dtype(np.int64)), "vec": ((TOY_DIM,), np.dtype(np.float32))}

    def target_encoder(self, spec):
        def fill(labels, out, i):
            c = int(label_field(labels, "cls"))
            if not 0 <= c < spec.extra["num_classes"]:
                raise LabelError("cls", f"class {c} out of range")
            out["cls"][i] = c

        return fill

    def decode_extra(self, members, labels, spec, out, i):
        out["vec"][i] = npy_member(members["vec.npy"], "vec.npy")

    def synth(self, out, n, rng, num_classes, size, videos):
        for split, count in split_sizes(n).items():
            rows = []
            for i in range(count):
                vid, c = f"{split}{i:03d}", i % num_classes
                frames = render_clip(rng, size, 3, self.segments, lambda t: [(c, num_classes, None)])
                wave = segment_audio(rng, self.segments, [[(c, num_classes)]] * self.segments)
                save_clip(frames, wave, False, "", os.path.join(out, "frames", vid),
                          os.path.join(out, "wave", vid + ".npy"), 1)
                os.makedirs(os.path.join(out, "vec"), exist_ok=True)
                np.save(os.path.join(out, "vec", vid + ".npy"),
                        np.full(TOY_DIM, c + i / 100, np.float32))
                rows.append(f"{vid},{c}")
            with open(os.path.join(out, f"{split}.txt"), "w") as f:
                f.write("\n".join(rows) + "\n")


class ToyEntryPoint(ToyDataset):
    name = "toy-ep"


@pytest.fixture
def toy():
    """ToyDataset registered in this process only (never in a worker's registry)."""
    DATASETS.add(ToyDataset.name, ToyDataset())
    try:
        yield get_dataset(ToyDataset.name)
    finally:
        DATASETS.remove(ToyDataset.name)


def test_plugin_dataset_packs_in_workers_and_streams_through_ray(toy, tmp_path, ray_local):
    from data_pipeline.ingest import IngestConfig, ShardStream
    from data_pipeline.synth import synth

    raw, out = tmp_path / "raw", tmp_path / "shards"
    synth(toy.name, 5, str(raw), seed=2, size=32)
    opts = PackOptions(frame_size=32, shard_samples=2)
    res = pack(toy.name, str(raw), "train", str(out), opts, workers=2, progress=False)
    single = pack(toy, str(raw), "train", str(tmp_path / "one"), opts, progress=False)
    assert res.manifest["dataset"] == "toy-plugin" and res.manifest["task"] == "toy"
    assert res.manifest["num_samples"] == 5 and res.manifest["num_shards"] == 3
    assert res.manifest["shards"] == single.manifest["shards"]  # same bytes from 1 or 2 workers
    verify(str(out))

    s = ShardStream(IngestConfig(url=str(out), batch_size=2, shuffle=False, drop_last=False))
    assert s.dataset is toy
    batches = list(s.epoch(0))
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"train{i:03d}" for i in range(5)]
    for b in batches:
        assert tuple(b.frames.shape[1:]) == (2, 32, 32, 3) and b.audio.shape[1] == 2 * 32000
        assert set(b.targets) == {"cls", "vec"}
        for i, key in enumerate(b.keys):
            j = int(key[-3:])
            assert int(b.targets["cls"][i]) == j % 3
            np.testing.assert_array_equal(b.targets["vec"][i].numpy(),
                                          np.full(TOY_DIM, j % 3 + j / 100, np.float32))


def test_plugin_layout_errors_name_the_dataset(toy, tmp_path):
    with pytest.raises(LayoutError, match="toy-plugin: unknown split 'dev'"):
        pack(toy.name, str(tmp_path), "dev", str(tmp_path / "o"), progress=False)
