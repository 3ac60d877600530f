"""Module buffers (router telemetry, BatchNorm running statistics) put back as they were after a
pass that must leave no trace: an activation checkpoint's recomputation (``trunk``), the FLOP
count's probe step (``avmoe.telemetry.flops``)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def buffers_restored(modules: Iterable[nn.Module]) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
