"""What a person sees on the console: Ray's, DeepSpeed's and torch's chatter off unless verbose.

A job prints its own progress (``avmoe.train.progress``) and its results; the libraries it runs
on print a great deal more (Ray Train's per-report lines, Ray Data's execution summaries,
DeepSpeed's op-load lines twice per rank, c10d's socket warnings, deprecation warnings). With
``--verbose`` (``AVMOE_VERBOSE=1``) all of it comes back.

``quiet_process()`` quiets this process; ``setup_worker_process`` is the same for every Ray
worker process of the job (tasks and actors: Ray Train's controller and workers, Ray Data's
decode tasks), installed as Ray's ``worker_process_setup_hook`` by ``job_runtime_env()``.
Warnings and errors always get through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from typing import Iterator

VERBOSE_ENV = "AVMOE_VERBOSE"

# logger -> level while quiet (WARNING keeps real problems visible)
QUIET_LEVELS = {
    "ray": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.tune": logging.WARNING,
    # polls the state API every few seconds and warns each time it is unavailable (an embedded
    # Ray has no dashboard); the placement group goes with the Ray instance anyway
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "DeepSpeed": logging.WARNING,
    "torch.distributed": logging.WARNING,
    "avmoe.train": logging.WARNING,  # the progress display says the same, once
    "avmoe.telemetry": logging.WARNING,
    "torch.utils.cpp_extension": logging.ERROR,  # "No CUDA runtime is found" on CPU workers
    "matplotlib": logging.WARNING,  # "generated new fontManager" on a worker's first plot
}

# Lines Ray's processes write to their stderr (C++ core-worker logs, not Python logging) that the
# driver would echo, and that say nothing about the job: Ray Train 2.60's own PreemptionWatcher
# actor is created with restartable object-store arguments and its core worker logs an ERROR for it
# on every run (ray-project/ray#53727).
KNOWN_NOISE = (
    re.compile(r"Actor with class name: 'PreemptionWatcher'.*max_restarts > 0"),
)

# environment of the job's processes while quiet: torch's C++ (c10d) warnings
QUIET_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR"}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0").lower() in ("1", "true", "yes", "on")


class _LibraryInfoFilter(logging.Filter):
    """Drops records below WARNING from Ray's loggers and from the root logger. Ray Train
    turns every ``print`` of a training worker into a root-logger INFO record (its
    ``patch_print``): DeepSpeed's op-load lines among them. Our own output does not come from
    there: the progress goes through ``avmoe.train.progress``."""

    _RAY_FILES = os.sep + "ray" + os.sep  # Ray Train names some loggers by file path

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        noisy = name in ("root", "ray") or name.startswith("ray.") or self._RAY_FILES in name
        return record.levelno >= logging.WARNING or not noisy


_FILTER = _LibraryInfoFilter()


def quiet_process() -> None:
    """Quiet the libraries' loggers and warnings in this process (no-op when verbose). Call it
    again after a library reconfigures logging (Ray Train does, in its worker processes)."""
    if verbose():
        return
    for name, level in QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    # Ray Train sets "ray.train" to DEBUG in its processes; the modules' own loggers keep a
    # level of their own (a record is dropped where it is made)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("ray.train.", "ray.data.")):
            logging.getLogger(name).setLevel(max(logging.WARNING, QUIET_LEVELS.get(name, 0)))
    for name in ("", "ray", "ray.train", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    if "ray" in sys.modules:  # (never the first import of Ray: its settings are read then)
        # Ray Data warns once per process that its progress bars are off (the ingest turns them off)
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")
        _filter_worker_logs()
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # noise of the stack that is not a problem of the job: torch's "Converting a tensor with
    # requires_grad", Ray Data's pandas reset_index, timm's registry overwrites
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    warnings.filterwarnings("ignore", message=".*inplace keyword.*")


def _drop_known_noise(data: dict) -> dict:
    lines = [ln for ln in data.get("lines", []) if not any(p.search(ln) for p in KNOWN_NOISE)]
    return dict(data, lines=lines)


def _filter_worker_logs() -> None:
    """Drop ``KNOWN_NOISE`` from the worker logs Ray echoes on the driver (its
    ``print_worker_logs``: the one place every worker's streamed line passes)."""
    import ray._private.worker as ray_worker

    printer = ray_worker.print_worker_logs
    if getattr(printer, "_avmoe_filtered", False):
        return

    def print_worker_logs(data, print_file, ignore_prefix=False):
        data = _drop_known_noise(data)
        if data["lines"]:
            printer(data, print_file, ignore_prefix)

    print_worker_logs._avmoe_filtered = True
    ray_worker.print_worker_logs = print_worker_logs


def setup_worker_process() -> None:
    """Ray's ``worker_process_setup_hook`` of avmoe jobs."""
    quiet_process()


def job_runtime_env() -> dict:
    """The runtime_env a job passes to ``ray.init`` (merged with a ``ray job submit`` one)."""
    env = {VERBOSE_ENV: "1" if verbose() else "0"}
    if not verbose():
        env.update(QUIET_ENV)
    return {"worker_process_setup_hook": "avmoe.console.setup_worker_process", "env_vars": env}


@contextlib.contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    """Swallow what a library prints (DeepSpeed's op-load lines) unless verbose; what it
    printed goes to stderr if the block raises."""
    if verbose():
        yield io.StringIO()
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise


def metric_table(metrics: dict[str, float], indent: str = "    ") -> str:
    """A long metric dict as aligned rows: ``group/name`` keys (AVQA's question types and
    subtypes) one row per group with the group's own value last; other keys four to a row.
    ``nan`` marks a metric that could not be computed (no sample of that kind in the split)."""
    def fmt(v: float) -> str:
        return "nan" if v != v else f"{v:.4f}"

    groups: dict[str, list[tuple[str, float]]] = {}
    for k, v in metrics.items():
        if "/" in k:
            g, _, sub = k.partition("/")
            groups.setdefault(g, []).append((sub, v))
    rest = [(k, v) for k, v in metrics.items() if "/" not in k and k not in groups]
    lines = []
    if groups:
        gw = max(len(g) for g in groups)
        sw = max(len(sub) for subs in groups.values() for sub, _ in subs)
        for g, subs in groups.items():
            cells = "   ".join(f"{sub:<{sw}} {fmt(v):>6}" for sub, v in subs)
            total = f"   (all {fmt(metrics[g])})" if g in metrics else ""
            lines.append(f"{indent}{g:<{gw}}  {cells}{total}")
    for i in range(0, len(rest), 4):
        lines.append(indent + "   ".join(f"{k} {fmt(v)}" for k, v in rest[i:i + 4]))
    return "\n".join(lines) if lines else indent + "(none)"
