"""bench/gpu.py's CPU fallback: the trainer's own step on the tiny preset, fed by the real ingest,
with activation checkpointing; every figure it reports is there, positive and finite (the figures
themselves are a benchmark's, not a test's: bench/README.md "GPU (`bench/gpu.py`)"). Needs no GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PEAK = 1e11  # a nominal peak: the CPU has none in the telemetry's table, AVMOE_PEAK_FLOPS supplies one


def test_cpu_fallback_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "AVMOE_PEAK_FLOPS": str(PEAK)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--preset", "tiny", "--steps", "3",
                           "--warmup", "1", "--activation-checkpointing", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for key in ("device", "device_type", "peak_flops", "precision", "preset", "batch_size", "grad_accum",
                "samples_per_step", "steps", "warmup", "frame_size", "torch", "machine", "runs"):
        assert key in result, key
    assert result["device_type"] == "cpu" and result["precision"] == "fp32" and result["preset"] == "tiny"
    assert result["peak_flops"] == PEAK
    (run,) = result["runs"]
    assert run["variant"] == "ckpt" and run["activation_checkpointing"] is True and run["compile"] is False
    assert run["steps_timed"] == 3 and len(run["step_times_s"]) == len(run["wait_times_s"]) == 4
    st = run["step_time_s"]
    for x in (st["median"], st["p10"], st["p90"], st["mean"], run["samples_per_s"], run["flops_per_sample"],
              run["mfu"], run["peak_memory_bytes"], run["first_step_s"], run["setup_s"]):
        assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, run
    assert st["p10"] <= st["median"] <= st["p90"]
    assert 0 <= run["data_wait_pct"] < 100 and math.isfinite(run["data_wait_pct"])
    timed = run["step_times_s"][1:]
    assert math.isclose(run["samples_per_s"], 3 * run["samples_per_step"] / sum(timed), rel_tol=1e-9)
    assert math.isclose(run["mfu"], run["flops_per_sample"] * run["samples_per_s"] / PEAK, rel_tol=1e-9)
    assert run["peak_memory_kind"].startswith("process peak RSS")
    assert run["decode_on"] in ("ingest", "trainer")
    assert run["trainable_params"] > 0
    # the printed table: the run's row, every figure positive
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| ckpt |"))
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", row)]
    assert len(numbers) >= 7 and all(x >= 0 for x in numbers) and "%" in row, row
    print(f"bench/gpu.py CPU fallback: {took:.1f} s")


def test_mfu_is_na_without_a_peak():
    run = {"variant": "plain", "step_time_s": {"median": 0.1, "p10": 0.09, "p90": 0.12}, "samples_per_s": 160.0,
           "mfu": None, "data_wait_pct": 1.0, "peak_memory_bytes": 2**30, "first_step_s": 1.0}
    text = bench.table({"runs": [run]})
    assert "| plain | 100.0 (90.0-120.0) | 160.00 | n/a | 1.0 | 1024 | 1.0 |" in text
    assert "torch.compile failed" in bench.table({"runs": [{"variant": "compile",
                                                            "error": "torch.compile failed: X"}]})


def test_activation_memory_mode_counts_less_with_checkpointing():
    rows = bench.saved_activations("tiny", 2)
    assert [r["variant"] for r in rows] == ["plain", "ckpt", "ckpt, torch.compile's path"]
    plain, ckpt, compiled_path = (r["saved_bytes"] for r in rows)
    assert 0 < ckpt < compiled_path < plain
