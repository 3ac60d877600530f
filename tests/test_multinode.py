"""Multi-node on one machine (``tests/multinode.py``): a head with no work, two CPU-only ingest
nodes, two trainer nodes, shards and checkpoints on S3 (moto on 127.0.0.1). One scenario
process per test module run (its own Ray cluster, apart from the session's embedded Ray): three
fits of the tiny AVE preset -- uninterrupted, under chaos (spot drain, ingest-node loss, trainer
node loss), and elastic after a loss with no replacement.

The longest test of the suite (~4 min on 2 cores; bounded by a 10-minute timeout)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def report(s3_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    out = work / "report.json"
    env = {**os.environ, **s3_server}
    proc = subprocess.run([sys.executable, str(HERE / "multinode.py"), "--out", str(out), "--work", str(work)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"multinode scenarios failed (rc {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _by_step(rows, after: float = 0.0) -> dict[tuple[int, int], list[str]]:
    """(step, rank) -> keys, the last attempt of each step winning."""
    out = {}
    for r in sorted(rows, key=lambda r: r["time"]):
        if r["time"] > after:
            out[(r["step"], r["rank"])] = r["keys"]
    return out


def test_decode_runs_on_ingest_nodes_and_training_on_trainer_nodes(report):
    """From Ray's own records (state API task and actor tables), not from our configuration."""
    kinds = report["ref"]["kinds"]
    assert sorted(kinds.values()) == ["head", "ingest", "ingest", "trainer", "trainer"]
    tasks, workers = report["ref"]["placement"]["decode_tasks"], report["ref"]["placement"]["train_workers"]
    assert len(tasks) >= 16 and len(workers) == 2
    assert {kinds[t["node"]] for t in tasks} == {"ingest"}
    assert len({t["node"] for t in tasks}) == 2  # both ingest nodes decode
    assert {kinds[w["node"]] for w in workers} == {"trainer"}
    assert len({w["node"] for w in workers}) == 2  # one worker per trainer node
    steps = report["ref"]["steps"]
    assert {kinds[r["node"]] for r in steps} == {"trainer"}
    assert report["ref"]["final_step"] == 8


def test_chaos_run_ends_bit_identical_with_the_same_samples_at_every_step(report):
    """Spot drain, ingest-node loss and trainer-node loss in one run: the final trainable weights
    equal the uninterrupted run's bit for bit, and every step trained on the same keys."""
    ref, chaos = report["ref"], report["chaos"]
    assert chaos["bit_identical_to_ref"] is True
    assert chaos["final_step"] == ref["final_step"] == 8
    # the epoch's train loss (and its parts) covers the steps before each restart: equal rows
    assert chaos["history"] == ref["history"]
    want = _by_step(ref["steps"])
    got = _by_step(chaos["steps"])
    assert got == want
    keys = [k for ks in got.values() for k in ks]
    assert len(keys) == len(set(keys)) == 16  # the epoch: every training sample once


def test_spot_drain_checkpoints_at_the_next_step_and_loses_at_most_one(report):
    drain = report["chaos"]["drain"]
    # the ranks checkpoint at the first step boundary after Ray Train's watcher saw the notice
    assert 0 <= drain["checkpoint_step"] - drain["steps_done_at_notice"] <= 1
    t_drain = next(e["time"] for e in report["events"] if e["what"] == "drain trainer node")
    first_pids = {r["pid"] for r in report["chaos"]["steps"] if r["time"] < t_drain}
    before_restart = [r for r in report["chaos"]["steps"] if r["pid"] in first_pids]
    # steps the first worker group trained past its last checkpoint: lost work
    assert max(r["step"] for r in before_restart) - drain["checkpoint_step"] <= 1
    # the restarted group resumed right after the preemption checkpoint, on the replacement node
    after = sorted((r for r in report["chaos"]["steps"] if r["pid"] not in first_pids), key=lambda r: r["time"])
    assert after[0]["step"] == drain["checkpoint_step"] + 1
    assert drain["checkpoint"] == f"epoch-0000-step-{drain['checkpoint_step']:07d}"


def test_ingest_node_loss_moves_decoding_to_the_surviving_node(report):
    chaos = report["chaos"]
    lost, t_lost = chaos["ingest_loss"]["node"], chaos["ingest_loss"]["time"]
    t_trainer = chaos["trainer_loss"]["time"]
    kinds = {**report["ref"]["kinds"]}
    later = [t for t in chaos["placement"]["decode_tasks"] if t["started"] > t_lost + 1.0]
    assert later and lost not in {t["node"] for t in later}
    # the same worker group went on through the ingest loss (no restart until the trainer loss)
    steps = chaos["steps"]
    pids_around = {r["pid"] for r in steps if t_lost - 1.0 < r["time"] < t_trainer}
    assert len(pids_around) == 2
    assert all(kinds.get(t["node"], "ingest") == "ingest" for t in chaos["placement"]["decode_tasks"])


def test_trainer_node_loss_restarts_from_the_latest_checkpoint(report):
    loss = report["chaos"]["trainer_loss"]
    rows = report["chaos"]["steps"]
    after = sorted((r for r in rows if r["time"] > loss["time"] + 1.0), key=lambda r: r["time"])
    assert after, "no step after the trainer node loss"
    assert loss["node"] not in {r["node"] for r in after}
    # no periodic checkpoints in this run: the restart resumes from the preemption checkpoint
    assert after[0]["step"] == report["chaos"]["drain"]["checkpoint_step"] + 1
    assert loss["seconds_to_first_step_after"] < 180


def test_elastic_run_continues_on_fewer_workers_without_repeating_or_losing_a_sample(report):
    el = report["elastic"]
    assert el["world_after"] == [1]
    rows = sorted(el["steps"], key=lambda r: r["time"])
    t_loss = next(e["time"] for e in report["events"] if e["what"].startswith("kill trainer node (no"))
    after = [r for r in rows if r["time"] > t_loss]
    resumed_from = after[0]["step"] - 1  # the checkpoint the one-worker group started from
    before = [r for r in rows if r["time"] <= t_loss and r["step"] <= resumed_from]
    consumed = [k for r in before + after for k in r["keys"]]
    counts = collections.Counter(consumed)
    assert len(counts) == 16 and set(counts.values()) == {1}, counts
    # the one worker took the rest of the same epoch order, in order
    ref_order = [k for (_, _), ks in sorted(_by_step(report["ref"]["steps"]).items()) for k in ks]
    assert [k for r in after for k in r["keys"]] == ref_order[2 * resumed_from:]
    assert el["final_step"] == resumed_from + len(after)
