"""Registry of tasks. Each task contributes its head, loss, metric and config; the trunk
(frozen backbones + adapters) is shared (see ``avmoe.tasks.base``)."""

from __future__ import annotations

from avmoe.registry import Registry
from avmoe.tasks.ave import AVETask
from avmoe.tasks.avqa import AVQATask
from avmoe.tasks.avs import AVSTask
from avmoe.tasks.avvp import AVVPTask
from avmoe.tasks.base import PRESETS, MetricAccumulator, Task

TASKS: Registry = Registry("task")
for _task in (AVETask(), AVVPTask(), AVSTask(), AVQATask()):
    TASKS.add(_task.name, _task)


def get_task(name: str) -> Task:
    return TASKS.get(name)


__all__ = ["PRESETS", "TASKS", "MetricAccumulator", "Task", "get_task"]
