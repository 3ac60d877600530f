"""Shared helpers for the trainer / job tests: small synthetic shards per task (built once per
session, cached by task) and a fast base TrainConfig.

Not a conftest: imported explicitly. CPU budget: the tiny presets at 32x32 frames, 2-4 samples
per rank and batch, 1 epoch; Ray Train runs share the session's ``ray_local`` (2 logical CPUs),
so each worker holds 0.5 CPU and the ingest's decode tasks 0.5.
"""

from __future__ import annotations

import os
from pathlib import Path

from avmoe.train import TrainConfig

_SHARDS: dict[tuple[str, int], str] = {}

def shards(tmp_path_factory, dataset: str, n: int = 8) -> str:
    """Shards of every split of a synthetic ``dataset`` (train n, val/test max(2, n/4))."""
    key = (dataset, n)
    if key not in _SHARDS:
        from data_pipeline.demo import prepare_demo_shards

        root = Path(tmp_path_factory.getbasetemp()) / "train-shards" / f"{dataset}-{n}"
        _SHARDS[key] = prepare_demo_shards(dataset, root=str(root), n=n, frame_size=32, workers=1,
                                           log=lambda *_: None)
    return _SHARDS[key]


def base_config(task: str, data: str, storage: str, name: str, **kw) -> TrainConfig:
    """A fast config of ``task`` (a task or task-variant name, e.g. "avs-ms3") on 2 workers."""
    from avmoe.tasks import get_task

    t = get_task(task)
    cfg = TrainConfig.of(task=t.name, variant=t.variant, data=data, storage=storage, name=name, workers=2,
                         cpus_per_worker=0.5, decode_cpus=0.5, epochs=1, batch_size=2, grad_accum=1, lr=1e-3,
                         scheduler="none", plots=False, metrics_address="127.0.0.1", metrics_port=0,
                         shuffle_buffer=16)
    return cfg.apply(kw)


def latest_checkpoint(run_dir: str) -> str:
    dirs = sorted(d for d in os.listdir(run_dir) if d.startswith("epoch-"))
    return os.path.join(run_dir, dirs[-1])


class SDScraper:
    """Scrapes every avmoe rank a file-SD directory announces, every ``interval`` s, in a thread,
    while a job runs: what Prometheus does, over real HTTP on 127.0.0.1."""

    def __init__(self, sd_dir: str, interval: float = 0.05):
        import threading

        self.sd_dir, self.interval = Path(sd_dir), interval
        self.samples: list[tuple[str, str, dict[str, str], float]] = []  # (target, name, labels, value)
        self.targets: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import json
        import urllib.error

        from avmoe.telemetry.render import scrape

        while not self._stop.is_set():
            for f in sorted(self.sd_dir.glob("*.json")):
                try:
                    targets = [t for group in json.loads(f.read_text()) for t in group["targets"]]
                except (OSError, ValueError):
                    continue
                for t in targets:
                    try:
                        got = scrape(f"http://{t}/metrics", timeout=2)
                    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                        continue  # the rank closed between the listing and the GET
                    self.targets.add(t)
                    self.samples += [(t, n, lab, v) for n, lab, v in got if n.startswith("avmoe_")]
            self._stop.wait(self.interval)

    def __enter__(self) -> "SDScraper":
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def values(self, name: str, **labels: str) -> list[float]:
        return [v for _, n, lab, v in self.samples
                if n == name and all(lab.get(k) == want for k, want in labels.items())]
