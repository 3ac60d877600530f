"""avmoe.telemetry: FLOPs/MFU accounting, a live /metrics endpoint of a real training run (the
trainer itself, in-process, on synthetic shards: ``avmoe.telemetry.demo.DemoRun``), and a real
Prometheus server scraping it (Debian's `prometheus`; skipped when not installable)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, free_port, stop_process  # noqa: E402
from model_fixtures import build_tiny, make_batch, single_thread  # noqa: E402

from avmoe.telemetry import GPU_METRICS, METRICS, WorkerMetrics, flops_per_sample, peak_flops_for  # noqa: E402
from avmoe.telemetry.demo import DemoRun  # noqa: E402
from avmoe.telemetry.render import render, scrape  # noqa: E402


def _loss_fn(task, cfg):
    return lambda m, b: task.loss(m(b), b, cfg)[0]


# ---------------------------------------------------------------------------- FLOPs / MFU


def test_flops_per_sample_counts_backward_without_frozen_weight_grads():
    task, cfg, model = build_tiny("ave")
    batch = make_batch("ave", cfg, batch_size=2)
    model.train()
    loss_fn = _loss_fn(task, cfg)
    before = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    with single_thread():
        peft = flops_per_sample(model, loss_fn, batch)
        # no side effects: grads untouched, router telemetry / norm running stats and RNG restored
        assert all(p.grad is None for p in model.parameters())
        for k, v in model.named_buffers():
            assert torch.equal(v, before[k]), k
        assert torch.equal(torch.get_rng_state(), rng)
        # forward only, for scale: backward must add to it
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            loss_fn(model, batch)
        fwd = fc.get_total_flops() / 2
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen, "the tiny AVE model must have a frozen backbone"
        for p in frozen:
            p.requires_grad_(True)
        full = flops_per_sample(model, loss_fn, batch)
    assert fwd > 0 and peft > fwd  # forward + (input-)gradients
    # Weight gradients of the frozen backbone are extra work that the PEFT count must not hold.
    assert full > peft * 1.1, (full, peft)
    assert full < 3.5 * fwd and peft < full


@pytest.mark.parametrize("task_name", ["avvp", "avs", "avqa"])
def test_flops_per_sample_on_every_task_keeps_existing_grads(task_name):
    """Every task head measures (AVVP feeds a leaf tensor to a module, which broke
    autograd.grad under FlopCounterMode) and gradients already accumulated are left as they were."""
    task, cfg, model = build_tiny(task_name)
    batch = make_batch(task_name, cfg, batch_size=2)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(trainable):
        p.grad = torch.full_like(p, float(i))
    with single_thread():
        flops = flops_per_sample(model, _loss_fn(task, cfg), batch)
    assert flops > 1e6
    for i, p in enumerate(trainable):
        assert torch.equal(p.grad, torch.full_like(p, float(i)))


def test_peak_table_by_device_name(monkeypatch):
    monkeypatch.delenv("AVMOE_PEAK_FLOPS", raising=False)
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA A10G") == 70e12
    assert peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("Some CPU") is None and peak_flops_for(None) is None
    monkeypatch.setenv("AVMOE_PEAK_FLOPS", "1e12")
    assert peak_flops_for(None) == 1e12


# ---------------------------------------------------------------------------- live endpoint


def _values(samples, name, **labels):
    return [v for n, lb, v in samples if n == name and all(lb.get(k) == x for k, x in labels.items())]


@pytest.fixture
def demo_run(tmp_path, tmp_path_factory, ray_local):
    """A real training run (the trainer, world size 1, tiny AVE preset on synthetic shards)
    serving its /metrics on 127.0.0.1, started on demand; stopped at the end of the test."""
    started = []

    def start(job: str, epochs: int = 3, sd_dir=None, hold_at_end: bool = True):
        run = DemoRun(str(tmp_path / job), job=job, epochs=epochs, n_train=8, batch_size=2,
                      sd_dir=str(sd_dir or tmp_path / "sd"), hold_at_end=hold_at_end)
        started.append(run)
        return run.start().wait_ready()

    yield start
    for run in started:
        run.stop()


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_live_scrape_values_change_and_labels(demo_run, tmp_path):
    run = demo_run("scrape-run", epochs=3)  # 8 samples / batch 2 = 4 steps per epoch
    url = run.url
    _wait(lambda: run.steps >= 2 or run.error, 90, "2 steps")
    first = scrape(url)
    steps_1 = _values(first, "avmoe_steps_total")[0]
    _wait(lambda: run.finished.is_set(), 180, "the end of training")  # held: the endpoint stays up
    assert run.error is None, run.error
    second = scrape(url)
    labels = {"job": "scrape-run", "task": "ave", "rank": "0", "node": "127.0.0.1"}
    for name in ("avmoe_steps_total", "avmoe_samples_per_second", "avmoe_loss", "avmoe_learning_rate",
                 "avmoe_grad_norm", "avmoe_epoch", "avmoe_flops_per_sample", "avmoe_data_wait_ratio",
                 "avmoe_checkpoint_save_duration_seconds", "avmoe_model_flops_per_second"):
        vals = _values(second, name, **labels)
        assert len(vals) == 1, (name, vals)
    steps_2 = _values(second, "avmoe_steps_total", **labels)[0]
    assert steps_1 >= 1 and steps_2 == 12 and steps_2 > steps_1  # the counter moved while we scraped
    assert _values(second, "avmoe_samples_total", **labels) == [24.0]  # 12 steps x batch 2
    assert _values(second, "avmoe_samples_per_second", **labels)[0] > 0
    assert _values(second, "avmoe_epoch", **labels) == [2.0]  # the last of 3 epochs
    assert _values(second, "avmoe_checkpoint_saves_total", **labels) == [3.0]  # one per epoch
    results = json.loads((tmp_path / "scrape-run" / "runs" / "scrape-run" / "results.json").read_text())
    last_val = results["history"][-1]["val"]["acc"]
    assert _values(second, "avmoe_validation_metric", metric="acc") == [pytest.approx(last_val)]
    assert results["history"][-1]["step"] == 12
    assert 0.0 <= _values(second, "avmoe_data_wait_ratio")[0] <= 1.0
    # router usage: per adapter position, expert weights are a distribution
    weights = [(lb["adapter"], float(v)) for n, lb, v in second if n == "avmoe_router_expert_weight"]
    adapters = {a for a, _ in weights}
    assert len(adapters) >= 2
    for a in adapters:
        assert abs(sum(v for b, v in weights if b == a) - 1.0) < 1e-4, a
    # CPU: no GPU gauges and no MFU (absent, not zero)
    if not torch.cuda.is_available():
        assert not [n for n, _, _ in second if n.startswith("avmoe_gpu_") or n == "avmoe_mfu_ratio"]
    # every exported sample name is one the README/dashboard table declares
    declared = set(METRICS) | set(GPU_METRICS)
    assert {n for n, _, _ in second} <= declared
    # the file-SD target points at this endpoint, and disappears with it
    sd_file = tmp_path / "sd" / "scrape-run-rank0.json"
    assert json.loads(sd_file.read_text())[0]["targets"] == [f"127.0.0.1:{run.port}"]
    run.release()
    run.wait(120)
    assert not run.alive() and not sd_file.exists()
    with pytest.raises(OSError):
        scrape(url, timeout=2)
    # the PNG renderer draws these series
    series = {}
    for t, samples in ((0.0, first), (1.0, second)):
        for n, lb, v in samples:
            series.setdefault((n, tuple(sorted(lb.items()))), []).append((t, v))
    png = render(series, tmp_path / "m.png")
    assert png.stat().st_size > 10_000


def test_disabled_never_raises_and_strict_mode(monkeypatch):
    m = WorkerMetrics(job="j", task="ave", rank=0, enabled=False)
    assert m.start() is None
    m.observe_step(samples=1, step_seconds=0.1)
    m.set_router_usage({"x": {"mean_weight": torch.tensor([0.5, 0.5])}})
    m.close()
    monkeypatch.setenv("AVMOE_METRICS", "0")
    assert WorkerMetrics(job="j", task="ave", rank=0).start() is None
    monkeypatch.delenv("AVMOE_METRICS")
    lax = WorkerMetrics(job="j", task="ave", rank=0, node="127.0.0.1", sd_dir="", strict=False)
    lax.observe_step(samples="not a number", step_seconds=0.1)  # logged, not raised
    strict = WorkerMetrics(job="j", task="ave", rank=0, node="127.0.0.1", sd_dir="", strict=True)
    with pytest.raises(ValueError):
        strict.observe_step(samples="not a number", step_seconds=0.1)


def test_default_bind_and_port_slots(monkeypatch, tmp_path):
    # loopback node -> loopback bind; a cluster node -> its own address (scraped from the head)
    monkeypatch.delenv("AVMOE_METRICS_ADDR", raising=False)
    assert WorkerMetrics(job="j", task="ave", rank=0, node="127.0.0.1").bind_address == "127.0.0.1"
    assert WorkerMetrics(job="j", task="ave", rank=0, node="10.0.3.7").bind_address == "10.0.3.7"
    monkeypatch.setenv("AVMOE_METRICS_ADDR", "127.0.0.1")
    base = free_port()
    monkeypatch.setenv("AVMOE_METRICS_PORT", str(base))
    monkeypatch.setenv("AVMOE_METRICS_PORT_SLOTS", "2")
    a = WorkerMetrics(job="j", task="ave", rank=0, node="10.0.3.7", sd_dir=str(tmp_path), strict=True)
    b = WorkerMetrics(job="j", task="ave", rank=1, node="10.0.3.7", sd_dir=str(tmp_path), strict=True)
    c = WorkerMetrics(job="j", task="ave", rank=2, node="10.0.3.7", sd_dir=str(tmp_path), strict=True)
    try:
        assert a.start() == base
        assert b.start() == base + 1  # second rank on the node takes the next slot
        with pytest.raises(OSError, match="no free metrics port"):
            c.start()
        assert sorted(p.name for p in tmp_path.glob("*.json")) == ["j-rank0.json", "j-rank1.json"]
    finally:
        for m in (a, b, c):
            m.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVML gauges and MFU)")
def test_gpu_gauges_and_mfu():
    m = WorkerMetrics(job="gpu", task="ave", rank=0, node="127.0.0.1", port=0, sd_dir="", strict=True)
    try:
        m.start()
        torch.ones(1024, 1024, device="cuda").sum().item()
        m.set_flops_per_sample(1e12)
        m.observe_step(samples=10, step_seconds=1.0)
        samples = scrape(f"http://127.0.0.1:{m.port}/metrics")
        names = {n for n, _, _ in samples}
        assert {"avmoe_gpu_utilization_ratio", "avmoe_gpu_memory_used_bytes", "avmoe_gpu_memory_total_bytes",
                "avmoe_cuda_memory_max_allocated_bytes"} <= names
        if m.peak_flops:
            assert abs(_values(samples, "avmoe_mfu_ratio")[0] - 1e13 / m.peak_flops) < 1e-9
    finally:
        m.close()


# ---------------------------------------------------------------------------- real Prometheus


def _prometheus_binary() -> str | None:
    """A real Prometheus server: $AVMOE_PROMETHEUS or `prometheus` on PATH (Debian package
    `prometheus`). Tests never install system packages themselves."""
    exe = os.environ.get("AVMOE_PROMETHEUS") or shutil.which("prometheus")
    return exe if exe and os.access(exe, os.X_OK) else None


@pytest.fixture
def prometheus(tmp_path):
    exe = _prometheus_binary()
    if exe is None:
        pytest.skip("no Prometheus server: install Debian's `prometheus` (apt-get install prometheus) "
                    "or set AVMOE_PROMETHEUS to its binary")
    # the shipped config, with its discovery paths moved into this test's directory
    cfg = yaml.safe_load((REPO / "cluster/monitoring/prometheus.yml").read_text())
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    ray_sd = tmp_path / "ray_sd.json"
    ray_sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": []}]))
    for job in cfg["scrape_configs"]:
        for fsd in job.get("file_sd_configs", []):
            fsd["files"] = [str(sd_dir / "*.json") if "avmoe" in f else str(ray_sd) for f in fsd["files"]]
            fsd["refresh_interval"] = "1s"
    cfg["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", sd_dir
    finally:
        stop_process(proc, timeout=20)
        log.close()


def test_real_prometheus_scrapes_a_running_job(prometheus, demo_run, tmp_path):
    base, sd_dir = prometheus
    run = demo_run("prom-run", epochs=40, sd_dir=sd_dir, hold_at_end=False)  # stopped once scraped
    q = urllib.parse.quote('avmoe_samples_per_second{job="prom-run"}')
    result: list = []

    def has_value():
        nonlocal result
        assert run.error is None, run.error
        try:
            with urllib.request.urlopen(f"{base}/api/v1/query?query={q}", timeout=3) as r:
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError):
            return False
        result = body.get("data", {}).get("result", [])
        return bool(result)

    _wait(has_value, 90, "Prometheus to scrape avmoe_samples_per_second via file SD")
    metric, (_, value) = result[0]["metric"], result[0]["value"]
    assert float(value) > 0
    # honor_labels kept the run's job label; our labels survived the scrape
    assert metric["job"] == "prom-run" and metric["rank"] == "0" and metric["task"] == "ave"
    assert metric["instance"] == f"127.0.0.1:{run.port}"
