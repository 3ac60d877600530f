"""bench/checkpoint.py --smoke: two CPU ranks save the AVE tiny model at ZeRO 0-3 (and through
DeepSpeed's decoupled checkpoint engine at ZeRO 0). The bytes it reports are the files on disk,
every file is attributed to one rank, and ZeRO >= 1 shards the optimizer state across the ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_checkpoint", REPO / "bench" / "checkpoint.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-ckpt")
    out = work / "result.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "checkpoint.py"), "--smoke", "--keep",
                           "--dir", str(work / "ckpt"), "--out", str(out), "--timeout", "240"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), proc.stdout, time.monotonic() - t0


def _rows(result):
    return {(r["stage"], r["saver"]): r for r in result["rows"].values()}


def _last(row):
    return row["repeats"][-1]["saves"][-1]


def test_smoke_rows_and_table(smoke):
    result, stdout, wall = smoke
    rows = _rows(result)
    torch_label, dec_label = bench.SAVER_LABEL["torch"], bench.SAVER_LABEL["decoupled"]
    assert {(s, torch_label) for s in range(4)} <= set(rows)
    assert (0, dec_label) in rows, result["probes"]
    assert "| ave tiny | 2 | torch.save (default) |" in stdout
    for row in rows.values():
        assert row["trainable_params"] > 0
        assert row["save_s"] and all(t > 0 for t in row["save_s"])
        assert all(d >= s for d, s in zip(row["durable_s"], row["save_s"]))
    print(f"bench/checkpoint.py --smoke: {wall:.1f} s")


def test_reported_bytes_are_the_files_on_disk(smoke):
    result, _, _ = smoke
    for row in result["rows"].values():
        save = _last(row)
        d = save["dir"]
        on_disk = {}
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                on_disk[os.path.relpath(p, d)] = os.path.getsize(p)
        reported = {f["path"]: f["bytes"] for f in save["files"]}
        assert reported == on_disk
        ranks = [0] * bench.WORLD
        for f in save["files"]:  # every file attributed to exactly one rank, by DeepSpeed's naming
            assert f["rank"] == bench.attribute(f["path"])[0]
            ranks[f["rank"]] += f["bytes"]
        assert save["bytes_per_rank"] == ranks == row["bytes_per_rank"]
        assert save["total_bytes"] == sum(on_disk.values()) == row["total_bytes"]
        assert {f"rank-{r}.json" for r in range(bench.WORLD)} <= set(on_disk)
        assert not save["duplicate_writes"]


def test_zero_shards_optimizer_state_across_ranks(smoke):
    result, _, _ = smoke
    rows = _rows(result)
    label = bench.SAVER_LABEL["torch"]
    z0 = _last(rows[(0, label)])
    # ZeRO 0: one model-states file (rank 0) holds the weights and the whole Adam state
    assert not [f for f in z0["files"] if f["path"].endswith("optim_states.pt")]
    (ms,) = [f for f in z0["files"] if f["path"].endswith("mp_rank_00_model_states.pt")]
    moments0, weights0 = ms["payload"]["moments"], ms["payload"]["weights"]
    trainable_bytes = 4 * rows[(0, label)]["trainable_params"]
    assert moments0 == pytest.approx(2 * trainable_bytes, rel=0.01)  # exp_avg + exp_avg_sq (+ steps)
    assert weights0 >= trainable_bytes
    for stage in (1, 2, 3):
        save = _last(rows[(stage, label)])
        optim = {f["rank"]: f for f in save["files"] if f["path"].endswith("optim_states.pt")}
        assert sorted(optim) == list(range(bench.WORLD)), f"ZeRO {stage}: one optimizer file per rank"
        for r, f in optim.items():
            assert f["path"].endswith(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
            # each rank holds half of ZeRO 0's Adam moments and half of the fp32 weights (its master
            # partition): about half of ZeRO 0's optimizer state + weights, not all of it
            assert f["payload"]["moments"] == pytest.approx(moments0 / 2, rel=0.05)
            assert f["payload"]["fp32_master"] == pytest.approx(trainable_bytes / 2, rel=0.05)
            assert f["bytes"] == pytest.approx((moments0 + trainable_bytes) / 2, rel=0.10)
            assert f["bytes"] < 0.6 * (moments0 + trainable_bytes)
        assert optim[0]["bytes"] == pytest.approx(optim[1]["bytes"], rel=0.05)
    # ZeRO 3 also partitions the (trainable) weights: no full model-states file on rank 0
    z3 = _last(rows[(3, label)])
    assert not [f for f in z3["files"] if f["path"].endswith("/mp_rank_00_model_states.pt")]
    assert z3["bytes_per_rank"][1] == pytest.approx(z3["bytes_per_rank"][0], rel=0.10)


def test_decoupled_row_writes_the_same_state(smoke):
    result, _, _ = smoke
    rows = _rows(result)
    sync, dec = _last(rows[(0, bench.SAVER_LABEL["torch"])]), _last(rows[(0, bench.SAVER_LABEL["decoupled"])])
    payload = lambda s: [f["payload"] for f in s["files"] if f["path"].endswith(".pt")]  # noqa: E731
    assert payload(dec) == payload(sync)
    assert rows[(0, bench.SAVER_LABEL["decoupled"])]["repeats"][-1]["saves"][-1]["commit_s"] >= 0


def test_attribute_names():
    assert bench.attribute("ds/state/zero_pp_rank_1_mp_rank_00_optim_states.pt")[0] == 1
    assert bench.attribute("ds/state/zero_pp_rank_0_mp_rank_00_model_states.pt")[0] == 0
    assert bench.attribute("ds/state/mp_rank_00_model_states.pt")[0] == 0
    assert bench.attribute("rank-1.json")[0] == 1
    with pytest.raises(ValueError):
        bench.attribute("ds/state/something_else.bin")
