"""Streaming ingest (data_pipeline.ingest): counts, contents, determinism, resume, S3, targets.

Data is built once per module: a synthetic AVE split (32x32 frames, uneven shards) packed to a
local directory. Bad-data and memory tests live in test_ingest_errors.py.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from data_pipeline.datasets import get_dataset, list_datasets
from data_pipeline.decode import decode_member
from data_pipeline.ingest import IngestConfig, IngestError, ShardStream
from data_pipeline.pack import PackOptions, pack
from data_pipeline.raydata import read_split
from data_pipeline.synth import synth
from data_pipeline.tario import iter_tar_samples

sys.path.insert(0, os.path.dirname(__file__))  # model_fixtures (not a conftest)

N_TRAIN = 20  # 5 shards of <= 6 samples (last one short)


@pytest.fixture(scope="module")
def ave_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    synth("ave", N_TRAIN, str(root / "raw"), seed=3, size=32)
    out = root / "shards"
    pack("ave", str(root / "raw"), "train", str(out),
         PackOptions(frame_size=32, shard_samples=6), progress=False)
    return str(out)


def manifest_keys(url: str, split: str = "train") -> list[str]:
    with open(f"{url}/{split}.manifest.json") as f:
        m = json.load(f)
    return [k for s in m["shards"] for k in s["keys"]]


def raw_samples(url: str, split: str = "train") -> dict[str, dict]:
    """key -> decoded members, read with the packer's own tar reader (the reference)."""
    with open(f"{url}/{split}.manifest.json") as f:
        m = json.load(f)
    out = {}
    for s in m["shards"]:
        with open(f"{url}/{s['name']}", "rb") as f:
            for key, members in iter_tar_samples(io.BytesIO(f.read()), s["name"]):
                out[key] = {k: decode_member(k, v) for k, v in members.items()}
    return out


def stream(url, rank=0, world=1, **kw) -> ShardStream:
    kw.setdefault("batch_size", 2)
    kw.setdefault("shuffle_buffer", 8)
    return ShardStream(IngestConfig(url=url, **kw), rank=rank, world_size=world)


def epoch_keys(s: ShardStream, epoch: int, start_batch: int = 0) -> list[list[str]]:
    return [b.keys for b in s.epoch(epoch, start_batch)]


def test_manifest_only_construction_and_named_errors(ave_url, tmp_path):
    s = stream(ave_url, batch_size=3, world=2)
    assert (s.task, s.num_samples, s.batches_per_epoch) == ("ave", N_TRAIN, N_TRAIN // 6)
    assert s.manifest["label_vocab"]["background"]
    with pytest.raises(IngestError, match="no manifest val.manifest.json"):
        stream(ave_url, split="val")
    with pytest.raises(IngestError, match="on_error"):
        stream(ave_url, on_error="ignore")
    with pytest.raises(IngestError, match="no full batch"):
        stream(ave_url, batch_size=11, world=2)
    with pytest.raises(IngestError, match="rank 2"):
        stream(ave_url, rank=2, world=2)


@pytest.mark.parametrize("world", [1, 2])
def test_every_key_once_per_epoch_equal_batches(ave_url, ray_local, world):
    b = 3
    streams = [stream(ave_url, r, world, batch_size=b) for r in range(world)]
    per_rank = [epoch_keys(s, 0) for s in streams]
    counts = {len(x) for x in per_rank}
    assert counts == {streams[0].batches_per_epoch}  # equal on every rank
    assert all(len(batch) == b for x in per_rank for batch in x)
    got = [k for x in per_rank for batch in x for k in batch]
    assert len(got) == len(set(got))  # nothing twice
    assert len(got) == (N_TRAIN // (b * world)) * b * world  # < b*world left over
    assert set(got) <= set(manifest_keys(ave_url))
    # the yielded order is the plan (which tests can compute without I/O)
    assert per_rank == [s.plan_keys(0) for s in streams]
    # evaluation: every key exactly once, some ranks get a short or one fewer batch
    evals = [stream(ave_url, r, world, batch_size=b, shuffle=False, drop_last=False)
             for r in range(world)]
    got = [k for s in evals for batch in epoch_keys(s, 0) for k in batch]
    assert sorted(got) == sorted(manifest_keys(ave_url))
    if world == 1:  # unshuffled = manifest order
        assert got == manifest_keys(ave_url)
    assert [len(epoch_keys(s, 0)) for s in evals] == [s.batches_per_epoch for s in evals]


def test_contents_round_trip_exactly(ave_url, ray_local):
    ref = raw_samples(ave_url)
    s = stream(ave_url, batch_size=4, shuffle=False, drop_last=False)
    seen = 0
    for batch in s.epoch(0):
        assert batch.frames.dtype == torch.uint8 and batch.audio.dtype == torch.int16
        assert batch.frames.shape[1:] == (10, 32, 32, 3)
        for i, key in enumerate(batch.keys):
            r = ref[key]
            frames = np.stack([r[f"f{t:02d}.jpg"] for t in range(10)])
            np.testing.assert_array_equal(batch.frames[i].numpy(), frames)
            np.testing.assert_array_equal(batch.audio[i].numpy(), r["audio.npy"])
            assert batch.targets["segment_labels"][i].tolist() == r["json"]["segment_labels"]
            seen += 1
    assert seen == N_TRAIN


def test_deterministic_for_seed_and_new_order_each_epoch(ave_url, ray_local):
    a = epoch_keys(stream(ave_url, 1, 2, seed=7), 0)
    b = epoch_keys(stream(ave_url, 1, 2, seed=7), 0)
    assert a == b
    assert epoch_keys(stream(ave_url, 1, 2, seed=7), 1) != a
    assert stream(ave_url, 1, 2, seed=8).plan_keys(0) != a
    # the shuffle mixes across shards: some batch holds keys of two shards
    with open(f"{ave_url}/train.manifest.json") as f:
        shard_of = {k: s["name"] for s in json.load(f)["shards"] for k in s["keys"]}
    full = stream(ave_url, batch_size=4, shuffle_buffer=20).plan_keys(0)
    assert [k for bt in full for k in bt] != sorted(shard_of, key=manifest_keys(ave_url).index)
    assert any(len({shard_of[k] for k in bt}) > 1 for bt in full)


def test_resume_mid_epoch_gives_exactly_the_rest(ave_url, ray_local):
    s = stream(ave_url, 0, 1, batch_size=2, seed=5)
    full = list(s.epoch(1))
    k = 3
    state = s.state(1, k)
    assert state["samples_consumed"] == 6 and state["position"] == 6
    json.dumps(state)  # goes into checkpoints
    resumed = stream(ave_url, 0, 1, batch_size=2, seed=5)
    rest = list(resumed.resume(state))
    assert [b.keys for b in rest] == [b.keys for b in full[k:]]
    assert [b.meta["batch_index"] for b in rest] == list(range(k, len(full)))
    for x, y in zip(rest, full[k:]):  # same bytes, not just the same keys
        assert torch.equal(x.frames, y.frames) and torch.equal(x.audio, y.audio)
    # epoch(e, start_batch=k) is the same thing; a state taken after resuming is consistent
    assert epoch_keys(resumed, 1, k) == [b.keys for b in full[k:]]
    assert resumed.state(1, k + 2) == s.state(1, k + 2)


def test_resume_with_other_world_size_redeals_the_rest(ave_url, ray_local):
    two = [stream(ave_url, r, 2, batch_size=2, seed=9) for r in range(2)]
    k = 2
    consumed = [k2 for s in two for bt in s.plan_keys(0)[:k] for k2 in bt]
    state = two[0].state(0, k)
    assert state["position"] == k * 2 * 2
    one = stream(ave_url, 0, 1, batch_size=2, seed=9)
    rest = [key for b in one.resume(state) for key in b.keys]
    assert not set(rest) & set(consumed)
    # the global order's suffix, re-dealt: nothing lost except the < batch leftover
    assert len(consumed) + len(rest) == N_TRAIN - (N_TRAIN - state["position"]) % 2
    # seeds / shuffle settings that do not match the checkpoint are refused by name
    with pytest.raises(IngestError, match="seed"):
        stream(ave_url, 0, 1, seed=10).resume(state)


def test_read_split_plain_ray_path(ave_url, ray_local):
    ds = read_split(ave_url, "train", read_concurrency=2)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(manifest_keys(ave_url))
    r = rows[0]
    assert r["f00.jpg"].shape == (32, 32, 3) and r["audio.npy"].dtype == np.int16
    # streaming_split consumers must run concurrently (one per training worker)
    from concurrent.futures import ThreadPoolExecutor

    shards = ds.streaming_split(2, equal=True)
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(
            lambda it: sum(len(b["__key__"]) for b in it.iter_batches(batch_size=4)), shards,
            timeout=120))
    assert counts[0] == counts[1] == N_TRAIN // 2


def test_s3_on_local_moto(ave_url, s3_env, ray_local, tmp_path):
    from data_pipeline import storage

    url = "s3://avmoe-test/ingest/ave"
    fs, path = storage.filesystem(url)
    for name in sorted(p.name for p in __import__("pathlib").Path(ave_url).iterdir()):
        fs.put_file(f"{ave_url}/{name}", f"{path}/{name}")
    local = list(stream(ave_url, 1, 2, seed=4).epoch(0))
    remote = list(stream(url, 1, 2, seed=4).epoch(0))
    assert [b.keys for b in remote] == [b.keys for b in local]
    assert all(torch.equal(a.frames, b.frames) and torch.equal(a.audio, b.audio)
               for a, b in zip(local, remote))
    assert sorted(r["__key__"] for r in read_split(url, "train").take_all()) == \
        sorted(manifest_keys(ave_url))
    # a bad object on S3 is named like a bad file
    name = json.loads(fs.cat_file(f"{path}/train.manifest.json"))["shards"][0]["name"]
    fs.pipe_file(f"{path}/{name}", fs.cat_file(f"{path}/{name}")[:5000])
    with pytest.raises(IngestError, match=f"{name}.*truncated"):
        for _ in stream(url, shuffle=False).epoch(0):
            pass


# ------------------------------------------------------------------ targets of every dataset
@pytest.fixture(scope="module")
def all_datasets(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest-all")
    urls = {}
    for ds in list_datasets():
        for split in ("train", "val"):
            pack(ds, str(synth_root / ds), split, str(out / ds),
                 PackOptions(frame_size=32, mask_size=32, shard_samples=3), progress=False)
        urls[ds] = str(out / ds)
    return urls


@pytest.mark.parametrize("ds", list_datasets())
def test_targets_match_labels(all_datasets, ray_local, ds):
    from data_pipeline.datasets.avqa import QUESTION_TYPES as AVQA_QUESTION_TYPES

    url = all_datasets[ds]
    for split in ("train", "val"):
        ref = raw_samples(url, split)
        s = stream(url, split=split, batch_size=2, shuffle=False, drop_last=False)
        vocab = s.manifest["label_vocab"]
        shapes = get_dataset(ds).target_shapes(s.spec)
        n = 0
        for batch in s.epoch(0):
            tg = batch.targets
            assert set(tg) == set(shapes)  # the dataset's targets, exactly
            for name, (shape, dtype) in shapes.items():
                assert tuple(tg[name].shape) == (len(batch.keys), *shape)
                assert tg[name].numpy().dtype == dtype
            for i, key in enumerate(batch.keys):
                lab, n = ref[key]["json"], n + 1
                if ds == "ave":
                    assert tg["segment_labels"][i].tolist() == lab["segment_labels"]
                elif ds == "avvp":
                    assert torch.nonzero(tg["video_labels"][i]).flatten().tolist() == \
                        sorted(lab["label_indices"])
                    np.testing.assert_array_equal(tg["features"][i].numpy(), ref[key]["r2p1d.npy"])
                    if split == "val":
                        for name, fld in (("gt_audio", "audio_events"),
                                          ("gt_visual", "visual_events")):
                            want = np.zeros((25, 10), np.uint8)
                            for c, on, off in lab[fld]:
                                want[c, on:off] = 1
                            np.testing.assert_array_equal(tg[name][i].numpy(), want)
                    else:
                        assert "gt_audio" not in tg
                elif ds.startswith("avs"):
                    nm = lab["num_masks"]
                    assert tg["mask_valid"][i].tolist() == [t < nm for t in range(5)]
                    for t in range(nm):
                        np.testing.assert_array_equal(tg["masks"][i, t].numpy(),
                                                      ref[key][f"m{t:02d}.png"])
                    assert not tg["masks"][i, nm:].any()
                elif ds == "avqa":
                    ids = tg["question_ids"][i].tolist()
                    toks = lab["question_tokens"]
                    assert [vocab["question_tokens"][j] for j in ids[:len(toks)]] == toks
                    assert ids[len(toks):] == [0] * (vocab["max_question_len"] - len(toks))
                    assert vocab["answers"][int(tg["answer"][i])] == lab["answer"]
                    assert AVQA_QUESTION_TYPES[int(tg["question_type"][i])] == \
                        tuple(lab["question_type"])
        assert n == s.num_samples


@pytest.mark.parametrize("task", ["ave", "avqa", "avs-ms3"])
def test_tiny_models_take_ingested_batches(all_datasets, ray_local, task):
    from model_fixtures import build_tiny, single_thread

    from avmoe.tasks import get_task

    s = stream(all_datasets[get_task(task).dataset], batch_size=2, split="val", shuffle=False)
    batch = next(iter(s.epoch(0)))
    t, cfg, model = build_tiny(task, **get_task(task).model_keys(s.manifest))
    model.eval()
    with single_thread(), torch.no_grad():
        out = model(batch)
        loss, parts = t.loss(out, batch, cfg)
    assert torch.isfinite(loss)
    acc = t.metric_accumulator(cfg)
    acc.update(t.predict(out, batch), batch)
    assert acc.compute()


def test_plan_end_position_is_clipped_to_the_epoch():
    """Without drop_last the last global batch is short: positions never pass the epoch."""
    from data_pipeline.plan import rank_plan

    plans = [rank_plan(np.arange(10), batch_size=4, world_size=2, rank=r, drop_last=False) for r in (0, 1)]
    assert [len(b) for b in plans[0].batches] == [4, 2] and [len(b) for b in plans[1].batches] == [4]
    assert [plans[0].end_position(k) for k in (0, 1, 2)] == [0, 8, 10]
    assert rank_plan(np.arange(10), 4, 2, 0, start=8, drop_last=False).end_position(1) == 10
