"""Render the dashboard's training panels from a live run's /metrics endpoint to a PNG.

    # against a running job (any rank's endpoint; repeat --url for several ranks)
    python -m avmoe.telemetry.render --url http://127.0.0.1:9460/metrics --duration 60 --out results/metrics.png
    # self-contained: a short real training run (the trainer, tiny AVE preset, synthetic shards) on
    # 127.0.0.1, scraped over HTTP while it runs
    python -m avmoe.telemetry.render --demo --out results/metrics.png

It polls the endpoint(s) every ``--interval`` seconds for ``--duration`` seconds (or until the
endpoint goes away), then plots each series over time with matplotlib: the same quantities as the
Grafana dashboard's avmoe panels (cluster/monitoring/grafana-avmoe-dashboard.json), including the
expert-usage heat map. Ray's own node metrics are not on a worker endpoint and are not drawn.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]]


def scrape(url: str, timeout: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    """One GET of a /metrics endpoint -> [(sample name, labels, value)]."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode("utf-8")
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), float(s.value)))
    return out


def poll(urls: list[str], duration: float, interval: float, stop: threading.Event | None = None,
         min_polls: int = 2) -> Series:
    series: Series = collections.defaultdict(list)
    t0 = time.time()
    polls = 0
    while True:
        now = time.time() - t0
        alive = 0
        for url in urls:
            try:
                for name, labels, value in scrape(url):
                    if name.startswith("avmoe_"):
                        series[(name, tuple(sorted(labels.items())))].append((now, value))
                alive += 1
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
        polls += 1
        if alive == 0 and polls >= min_polls and series:
            break  # the job ended
        if now >= duration or (stop is not None and stop.is_set() and polls >= min_polls):
            break
        time.sleep(interval)
    return dict(series)


# (panel title, sample names, y label, scale)
PANELS = [
    ("samples/s per rank", ["avmoe_samples_per_second"], "samples/s", 1.0),
    ("step time and data wait", ["avmoe_step_duration_seconds", "avmoe_data_wait_duration_seconds"], "s", 1.0),
    ("data-wait % of step", ["avmoe_data_wait_ratio"], "%", 100.0),
    ("MFU (GPU only)", ["avmoe_mfu_ratio"], "%", 100.0),
    ("model TFLOP/s", ["avmoe_model_flops_per_second"], "TFLOP/s", 1e-12),
    ("loss", ["avmoe_loss"], "loss", 1.0),
    ("validation metric", ["avmoe_validation_metric"], "value", 1.0),
    ("learning rate", ["avmoe_learning_rate"], "lr", 1.0),
    ("grad norm", ["avmoe_grad_norm"], "L2 norm", 1.0),
    ("checkpoint save time", ["avmoe_checkpoint_save_duration_seconds"], "s", 1.0),
    ("GPU utilisation (NVML)", ["avmoe_gpu_utilization_ratio"], "%", 100.0),
    ("GPU memory used (NVML)", ["avmoe_gpu_memory_used_bytes"], "GiB", 1 / 2**30),
]

_DROP = {"job", "task", "node"}


def _legend(name: str, labels: tuple[tuple[str, str], ...], multi_name: bool) -> str:
    parts = [f"{k}={v}" for k, v in labels if k not in _DROP]
    short = name.replace("avmoe_", "")
    return (short + " " if multi_name else "") + ",".join(parts)


def render(series: Series, out: str | Path, title: str = "avmoe training metrics") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(PANELS) + 1
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (ptitle, names, ylabel, scale) in zip(flat, PANELS):
        drawn = 0
        for (name, labels), pts in sorted(series.items()):
            if name in names and pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [y * scale for y in ys], marker=".", ms=3,
                        label=_legend(name, labels, len(names) > 1))
                drawn += 1
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("s since start", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "absent (CPU run or not reported)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="gray")
    # expert-usage heat map: last mean routing weight, adapters x experts (rank 0, or first rank)
    ax = flat[len(PANELS)]
    last: dict[tuple[str, str], float] = {}
    ranks = sorted({dict(lb).get("rank", "") for (nm, lb) in series if nm == "avmoe_router_expert_weight"})
    for (name, labels), pts in series.items():
        d = dict(labels)
        if name == "avmoe_router_expert_weight" and pts and d.get("rank", "") == (ranks[0] if ranks else ""):
            last[(d["adapter"], d["expert"])] = pts[-1][1]
    if last:
        adapters = sorted({a for a, _ in last})
        experts = sorted({e for _, e in last}, key=int)
        grid = np.array([[last.get((a, e), np.nan) for e in experts] for a in adapters])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(adapters)), adapters, fontsize=6)
        ax.set_xticks(range(len(experts)), experts, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"expert usage (mean routing weight, rank {ranks[0] if ranks else '?'})", fontsize=10)
    else:
        ax.set_title("expert usage", fontsize=10)
        ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _demo(args):
    """A real short training run (``avmoe.telemetry.demo.DemoRun``) on the synthetic demo shards."""
    import tempfile

    from avmoe.ray_env import init_local_ray

    from .demo import DemoRun

    init_local_ray(num_cpus=max(2, os.cpu_count() or 1))
    run = DemoRun(tempfile.mkdtemp(prefix="avmoe-demo-"), job="demo", epochs=args.epochs, n_train=48,
                  batch_size=4, data=args.data).start().wait_ready()
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avmoe.telemetry.render", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", default=[], help="a worker /metrics URL (repeatable)")
    ap.add_argument("--demo", action="store_true",
                    help="run a short real training run (tiny AVE preset, synthetic shards) locally and scrape it")
    ap.add_argument("--epochs", type=int, default=5, help="--demo: epochs of the run")
    ap.add_argument("--data", default=None, help="--demo: AVE shards to train on (default: generated)")
    ap.add_argument("--duration", type=float, default=120.0, help="max seconds to poll")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    ap.add_argument("--out", default="results/metrics.png")
    args = ap.parse_args(argv)
    if not args.url and not args.demo:
        ap.error("give --url or --demo")
    run = None
    urls = list(args.url)
    if args.demo:
        run = _demo(args)
        urls.append(run.url)
    try:
        series = poll(urls, args.duration, args.interval, stop=run.finished if run else None)
    finally:
        if run is not None:
            run.stop()
    if run is not None and run.error is not None:
        print(f"the demo run failed: {run.error}", file=sys.stderr)
        return 1
    if not series:
        print(f"no avmoe_* samples scraped from {urls}", file=sys.stderr)
        return 1
    path = render(series, args.out)
    print(f"wrote {path} ({len(series)} series)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
