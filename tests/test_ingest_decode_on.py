"""Decode placement of the streaming ingest (``IngestConfig.decode_on``): JPEG frames decoded in
the Ray Data tasks ("ingest"), in the consuming process ("trainer", a thread pool) or on its GPU
("gpu", nvJPEG). "trainer" must give bit-identical batches and the same errors as "ingest"."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from data_pipeline.ingest import AUTO_DECODE_ON, IngestConfig, IngestError, ShardStream

sys.path.insert(0, os.path.dirname(__file__))
from test_ingest_errors import copy_split, damage, good, rewrite_sample  # noqa: E402,F401  (the same shards and damage cases)

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def packed(good):
    """Real packed shards: synthetic AVE videos through the packer (JPEG q90 frames): the error
    tests' set."""
    return good


def batches(url, decode_on, epoch=0, start_batch=0, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("shuffle_buffer", 8)
    world, rank = kw.pop("world", 1), kw.pop("rank", 0)
    s = ShardStream(IngestConfig(url=str(url), decode_on=decode_on, **kw), rank=rank,
                    world_size=world)
    assert s.decode_on == decode_on
    return s, list(s.epoch(epoch, start_batch))


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys and x.meta == y.meta
        assert x.frames.dtype == y.frames.dtype == torch.uint8
        assert torch.equal(x.frames, y.frames) and torch.equal(x.audio, y.audio)
        assert x.targets.keys() == y.targets.keys()
        for k in x.targets:
            assert x.targets[k].dtype == y.targets[k].dtype and torch.equal(x.targets[k], y.targets[k])


def test_trainer_decode_is_bit_identical_to_ingest_decode(packed, ray_local):
    # shuffled, two ranks, a resume mid-epoch, two decode threads, and evaluation order
    for kw in ({"world": 2, "rank": 1, "epoch": 1}, {"start_batch": 2, "decode_threads": 2},
               {"shuffle": False, "drop_last": False, "batch_size": 5}):
        _, ing = batches(packed, "ingest", **dict(kw))
        s, tr = batches(packed, "trainer", **dict(kw))
        assert_identical(ing, tr)
        assert tr and all(b.frames.abs().sum() > 0 for b in tr)


@pytest.mark.parametrize("case", ["corrupt_jpeg", "wrong_size_frame", "frame_and_labels",
                                  "bad_labels"])
def test_bad_data_same_errors_under_both_modes(packed, tmp_path, ray_local, case):
    url, manifest = copy_split(packed, tmp_path)
    e1 = manifest["shards"][1]
    if case == "wrong_size_frame":
        import simplejpeg

        key, member = e1["keys"][1], "f05.jpg"

        def mutate(m):
            m[member] = simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8))
            return m
        rewrite_sample(url, manifest, 1, key, mutate)
        shard, bad = e1["name"], [key]
    elif case == "frame_and_labels":
        # a bad frame and labels that do not fit (found after the frames) in one sample: a
        # decoding task meets the frame first, so must the consumer
        shard, key, member, _, bad = damage("corrupt_jpeg", url, manifest)

        def mutate(m):
            lab = json.loads(m["json"])
            lab["segment_labels"] = lab["segment_labels"][:4]
            m["json"] = json.dumps(lab).encode()
            return m
        rewrite_sample(url, manifest, 1, key, mutate)
    else:
        shard, key, member, _, bad = damage(case, url, manifest)

    errors = {}
    for mode in ("ingest", "trainer"):
        kw = dict(batch_size=3, shuffle=False, drop_last=False, shuffle_buffer=6)
        with pytest.raises(IngestError) as ei:
            batches(url, mode, on_error="raise", **kw)
        errors[mode] = ei.value
        s, got = batches(url, mode, on_error="skip", **kw)
        keys = [k for b in got for k in b.keys]
        assert keys == [k for sh in manifest["shards"] for k in sh["keys"] if k not in bad]
        assert s.skipped_total == len(bad) == sum(b.meta["skipped"] for b in got)
        assert len(got) == s.batches_per_epoch
    a, b = errors["ingest"], errors["trainer"]
    assert str(a) == str(b), (str(a), str(b))
    assert (a.shard, a.key, a.member) == (b.shard, b.key, b.member) == (shard, key, member)
    if case == "wrong_size_frame":
        assert "frame is 16x16, manifest frame_size 32" in str(b)


def test_gpu_decode_without_cuda_is_a_named_error(packed):
    if CUDA:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(IngestError, match="decode_on='gpu' needs a CUDA device"):
        ShardStream(IngestConfig(url=str(packed), decode_on="gpu"))
    from avmoe.train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="decode_on='gpu' needs a CUDA device"):
        TrainConfig.of(task="ave", data="x", decode_on="gpu").validate()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (nvJPEG)")
def test_gpu_decode_matches_cpu_decode(packed, ray_local):  # pragma: no cover - GPU only
    _, ing = batches(packed, "ingest", world=2, rank=0)
    _, gpu = batches(packed, "gpu", world=2, rank=0)
    assert len(ing) == len(gpu)
    for x, y in zip(ing, gpu):
        assert x.keys == y.keys and y.frames.is_cuda and y.frames.shape == x.frames.shape
        diff = (x.frames.int() - y.frames.cpu().int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 16  # nvJPEG's IDCT is not libjpeg's
        assert torch.equal(x.audio, y.audio)


def test_gpu_decode_path_on_cpu_tensors(packed):
    """The nvJPEG path's batching, layout and error naming, with torchvision's CPU decoder
    standing in for the GPU (no Ray: the decode task run in-process)."""
    from data_pipeline.decode_task import decode_task
    from data_pipeline.frame_decode import FrameDecoder
    from data_pipeline.sample import FRAMES, OK, SampleSpec

    s = ShardStream(IngestConfig(url=str(packed), batch_size=4, shuffle=False))
    plan = s._plan(0, 0, None)
    task = {"spec": np.array(s._tasks(plan)[:2], dtype=object)}
    kw = dict(base=str(packed), spec=s.spec.to_dict(), storage_options={}, max_gap=0,
              dataset=s.dataset)
    ref = list(decode_task(task, decode_frames=True, **kw))
    raw = list(decode_task(task, decode_frames=False, **kw))
    assert FRAMES not in raw[0] and raw[0]["frames_jpeg"][0][:2] == b"\xff\xd8"
    dec = FrameDecoder(SampleSpec(**s.spec.to_dict()), "gpu", device="cpu")
    for r, cols in zip(ref, raw):
        shards = [s.index.shard_names[s.index.shard_of[s.index.keys.index(k)]] for k in cols["key"]]
        got = dec.submit(cols, shards).result()
        assert got[OK].all()
        assert got[FRAMES].shape == r[FRAMES].shape
        diff = (got[FRAMES].int() - torch.from_numpy(r[FRAMES]).int()).abs()
        assert diff.max() <= 2  # the same libjpeg-turbo, possibly another IDCT
    cols = dict(raw[0])
    cols["frames_jpeg"] = cols["frames_jpeg"].copy()
    cols["frames_jpeg"][1] = b"\x00" * len(cols["frames_jpeg"][1])  # not a JPEG at all
    got = dec.submit(cols, ["train-x.tar"] * len(cols["key"])).result()
    assert list(got[OK]) == [True, False, True, True][:len(cols["key"])]
    assert got["err_member"][1] == "f00.jpg" and "does not decode as JPEG" in got["error"][1]
    assert got["error"][1].startswith(f"train-x.tar: sample {cols['key'][1]!r} member 'f00.jpg'")
    assert int(got[FRAMES][1].abs().sum()) == 0


def test_settings_named_errors_and_auto(packed):
    with pytest.raises(IngestError, match="decode_on must be one of"):
        IngestConfig(url=str(packed), decode_on="cpu").validate()
    with pytest.raises(IngestError, match="decode_threads"):
        IngestConfig(url=str(packed), decode_threads=0).validate()
    auto = "ingest" if CUDA else AUTO_DECODE_ON  # CPU training: the measured choice
    assert AUTO_DECODE_ON == "trainer"
    assert IngestConfig(url="x").resolved_decode_on() == auto
    assert IngestConfig(url="x", decode_resources={"CPU": 0.5}).resolved_decode_on() == auto
    # decode tasks pinned to dedicated ingest nodes: decode there
    assert IngestConfig(url="x", decode_resources={"CPU": 1, "ingest": 1}).resolved_decode_on() \
        == "ingest"
    assert IngestConfig(url="x", decode_on="ingest").resolved_decode_on() == "ingest"
    from avmoe.train import cli

    cfg, _, _ = cli.config_from_args("ave", ["--data", "x", "--decode-on", "trainer",
                                             "decode_threads=3"])
    cfg.validate()
    assert (cfg.ingest.decode_on, cfg.ingest.decode_threads) == ("trainer", 3)


def test_first_tasks_ramp_up_without_changing_the_plan(packed):
    s = ShardStream(IngestConfig(url=str(packed), batch_size=1, shuffle_buffer=12))
    plan = s._plan(0, 0, None)
    tasks = [json.loads(t)["batches"] for t in s._tasks(plan)]
    assert [len(t) for t in tasks] == [1, 2, 4, 5]  # then window shares (12 here)
    flat = [it[2] for t in tasks for b in t for it in b]
    assert flat == [s.index.keys[f] for b in plan.batches for f in b]
    for t in tasks:  # rows numbered from 0 within each task
        assert [it[0] for b in t for it in b] == list(range(sum(len(b) for b in t)))
