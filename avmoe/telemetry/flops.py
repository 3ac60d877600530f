"""FLOPs per training sample (measured on the real graph) and device peaks for MFU.

MFU = flops_per_sample × samples/s ÷ peak (../shared/spec/anchors.md §6.3). The count comes from
``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the actual training
graph rather than the 6N rule: with a frozen backbone autograd never forms the backbone's weight
gradients (only the input gradients that reach the adapters), so a PEFT step costs ≈4N + adapter
terms, and 6N would overstate MFU by about 1.5×. Backward is the training step's own
``loss.backward()``; the trainable parameters' ``.grad`` are stashed before and put back after,
so the measurement leaves no gradient behind. (``torch.autograd.grad`` would avoid the stash but
fails under FlopCounterMode's module tracker when a module receives a leaf tensor, as the AVVP
head does: "A leaf node was passed to _will_engine_execute_node".)
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch import nn

# bf16 dense (no sparsity) tensor-core peak per device, FLOP/s. Matched in order against
# torch.cuda.get_device_name() (lower-cased), so the more specific names come first.
# Sources: NVIDIA datasheets; pytorch/torchtitan torchtitan/tools/utils.py get_peak_flops.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10g", 70e12),  # AWS g5: 70 TFLOP/s bf16 dense (datasheet 140 with sparsity)
    ("a10", 125e12),
    ("rtx 6000 ada", 364e12),
    ("a6000", 155e12),
    ("v100", 125e12),  # no bf16: fp16 tensor-core peak
    ("t4", 65e12),  # no bf16: fp16 tensor-core peak
)

PEAK_ENV = "AVMOE_PEAK_FLOPS"  # override for devices not in the table


def peak_flops_for(device_name: str | None) -> float | None:
    """bf16 dense peak FLOP/s for a device name, or None when unknown (no MFU then)."""
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env)
    if not device_name:
        return None
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def current_device_peak() -> tuple[str | None, float | None]:
    """(device name, peak) for this process's current CUDA device; (None, None) on CPU."""
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    return name, peak_flops_for(name)


@contextlib.contextmanager
def _preserved_state(model: nn.Module):
    """Leave no trace of the measurement: buffers (router telemetry, norm running stats) and the
    RNG streams (dropout, router noise) are restored, so training is bit-identical with or
    without the measurement."""
    from avmoe.models.buffers import buffers_restored

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), buffers_restored([model]):
        yield


def flops_per_sample(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                     batch_size: int | None = None) -> float:
    """FLOPs of one training step (forward + backward) divided by the batch size.

    ``loss_fn(model, batch)`` must return the scalar training loss, built exactly as the training
    step builds it (same autocast, same mode). Only parameters with ``requires_grad`` get weight
    gradients, as in training; frozen parameters contribute their forward and the input-gradient
    part of backward only. ``model.train()``/``eval()`` mode is left as the caller set it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    n = batch_size if batch_size is not None else batch.batch_size  # an AVBatch unless given
    if n <= 0:
        raise ValueError("batch_size must be positive")
    trainable = [p for p in model.parameters() if p.requires_grad]
    stashed = [p.grad for p in trainable]
    with _preserved_state(model):
        try:
            for p in trainable:
                p.grad = None
            counter = FlopCounterMode(display=False)
            with counter:
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError("loss_fn must return a scalar tensor")
                if trainable and loss.requires_grad:
                    loss.backward()
            total = counter.get_total_flops()
        finally:
            for p, g in zip(trainable, stashed):
                p.grad = g
    return float(total) / n
