"""The task registry. Every module of this package registers its task(s) when imported (they
are all imported here, so a new ``avmoe/tasks/<name>.py`` needs no edit elsewhere); tasks of
other packages register through the ``avmoe.tasks`` entry-point group, or by importing their
module before ``get_task``. See docs/adding-a-task.md."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from avmoe.config import ConfigError
from avmoe.tasks.base import PRESETS, TASKS, DemoRun, MetricAccumulator, Task, TaskAuxiliary, register_task


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group="avmoe.tasks"):
        ep.load()


def get_task(name: str) -> Task:
    """The task registered as ``name``, bound to its default variant; ``name-variant``
    (e.g. ``"avs-ms3"``) binds that variant."""
    if name in TASKS:
        return TASKS.get(name)()
    base, _, variant = name.rpartition("-")
    if base in TASKS and variant in TASKS.get(base).variants:
        return TASKS.get(base)(variant)
    TASKS.get(name)  # raises, listing the known names
    raise AssertionError(name)


def list_tasks() -> list[str]:
    """Registered task names (one per job script)."""
    return TASKS.names()


def task_variants() -> list[str]:
    """Every (task, variant) as its full name: ``ave``, ``avs-s4``, ``avs-ms3``, ..."""
    out = []
    for name in list_tasks():
        cls = TASKS.get(name)
        out += [f"{name}-{v}" for v in cls.variants] if cls.variants else [name]
    return out


_discover()

__all__ = ["PRESETS", "TASKS", "ConfigError", "DemoRun", "MetricAccumulator", "Task", "TaskAuxiliary", "get_task", "list_tasks",
           "register_task", "task_variants"]
