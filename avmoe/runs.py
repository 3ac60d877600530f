"""The runs under a storage URL: ``python -m avmoe.runs list`` / ``show NAME``.

    python -m avmoe.runs list [--storage URL]         # a line per run: status, best, latest checkpoint
    python -m avmoe.runs show NAME [--storage URL]     # one run: config, history, test metrics, resume command

A run is a directory ``<storage>/<name>/`` holding checkpoints (``epoch-EEEE-step-SSSSSSS/``
with ``trainer.json``) and, once finished, ``results.json``. Status: ``finished`` (results.json
with test metrics), ``stopped`` (results.json of a run stopped at ``max_steps``), ``evaluated``
(an ``--eval-only`` run), ``incomplete`` (checkpoints, no results: running, interrupted or
failed; run the resume command to continue it). Storage defaults to the jobs' default
(``$AVMOE_STORAGE``, else ``~/.local/share/avmoe/runs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class RunInfo:
    name: str
    status: str
    task: str | None
    best: str | None  # "acc 0.7667 (epoch 5)"
    latest_checkpoint: str | None
    step: int | None
    resume: str | None
    results: dict[str, Any] | None
    trainer: dict[str, Any] | None


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_info(storage_url: str, name: str) -> RunInfo:
    from data_pipeline import storage

    fs, base = storage.filesystem(storage_url)
    run = storage.join(base, name)
    results = _read_json(fs, storage.join(run, "results.json"))
    try:
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(run, detail=False)]
    except FileNotFoundError:
        entries = []
    ckpts = sorted(e for e in entries if e.startswith("epoch-"))
    latest = ckpts[-1] if ckpts else None
    meta = _read_json(fs, storage.join(storage.join(run, latest), "trainer.json")) if latest else None
    trainer = (meta or {}).get("trainer")
    config = (results or {}).get("config") or ((meta or {}).get("meta") or {}).get("config")
    task = (results or {}).get("task") or ((meta or {}).get("meta") or {}).get("task")
    if results is None:
        status = "incomplete"
    elif results.get("stopped_at_max_steps"):
        status = "stopped"
    elif not results.get("history") and results.get("test") is not None:
        status = "evaluated"
    else:
        status = "finished"
    best = None
    b = (results or {}).get("best") or {}
    primary = (results or {}).get("primary_metric")
    if b.get("epoch") is not None and primary:
        best = f"{primary} {b.get(f'val_{primary}'):.4f} (epoch {b['epoch']})"
    elif trainer and trainer.get("best_score") is not None:
        best = f"{trainer['best_score']:.4f} (epoch {trainer.get('best_epoch')})"
    resume = None
    if config and status in ("incomplete", "stopped"):
        job = config["task"]
        resume = f"python jobs/{job}.py --name {name} --storage {storage_url}" + (
            f" --data {config['paths']['data']}" if config.get("paths", {}).get("data") else "")
    return RunInfo(name, status, task, best, latest, (trainer or {}).get("step"), resume, results, trainer)


def list_runs(storage_url: str) -> list[RunInfo]:
    from data_pipeline import storage

    fs, base = storage.filesystem(storage_url)
    if not fs.exists(base):
        return []
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=True)
                   if e["type"] == "directory")
    infos = []
    for name in names:
        info = run_info(storage_url, name)
        if info.results is not None or info.latest_checkpoint is not None:
            infos.append(info)
    return infos


def format_list(infos: list[RunInfo]) -> str:
    if not infos:
        return "(no runs)"
    rows = [("run", "task", "status", "best (validation)", "latest checkpoint")]
    rows += [(i.name, i.task or "?", i.status, i.best or "-", i.latest_checkpoint or "-") for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for i in infos:
        if i.resume:
            lines.append(f"  resume {i.name}: {i.resume}")
    return "\n".join(lines)


def format_show(i: RunInfo) -> str:
    from avmoe.console import metric_table

    lines = [f"run {i.name}: {i.task or '?'}, {i.status}", f"  best on validation: {i.best or '-'}",
             f"  latest checkpoint: {i.latest_checkpoint or '-'} (step {i.step})"]
    r = i.results or {}
    for h in r.get("history", []):
        primary = r.get("primary_metric")
        lines.append(f"  epoch {h['epoch']:3d}  step {h['step']:6d}  train_loss {h['train_loss']:.4f}  "
                     f"val {primary} {h['val'].get(primary, float('nan')):.4f}")
    if r.get("test"):
        lines += ["  test:", metric_table(r["test"])]
    if i.resume:
        lines.append(f"  resume: {i.resume}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from avmoe.train.cli import default_storage

    p = argparse.ArgumentParser(prog="python -m avmoe.runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    ls = sub.add_parser("list", help="every run under the storage URL")
    ls.add_argument("--storage", default=None, help="storage URL (default: the jobs' default)")
    sh = sub.add_parser("show", help="one run")
    sh.add_argument("name")
    sh.add_argument("--storage", default=None, help="storage URL (default: the jobs' default)")
    args = p.parse_args(argv)
    url = args.storage or default_storage()
    if args.verb == "list":
        print(format_list(list_runs(url)))
        return 0
    info = run_info(url, args.name)
    if info.results is None and info.latest_checkpoint is None:
        print(f"error: no run {args.name!r} under {url}", file=sys.stderr)
        return 1
    print(format_show(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
