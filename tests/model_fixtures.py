"""Shared helpers for the model / task tests (tiny presets, synthetic batches).

Not a conftest: import explicitly (``from model_fixtures import ...``; pytest puts ``tests/`` on
``sys.path`` in its default rootdir-based import mode, and the tests add it otherwise).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from avmoe.batch import AVBatch

from avmoe.tasks import get_task, task_variants

TASK_NAMES = tuple(task_variants())  # every task and variant, from the registry
TEST_SEGMENTS = 4  # at most this many segments in the model tests (the data's 10 / 5 cost CPU time)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models are dominated by op overhead; one intra-op thread is faster on 2 shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_batch(task: str, cfg, batch_size: int = 2, seed: int = 0, frame_hw=(40, 48)) -> AVBatch:
    """A fixed random batch in the shard format (uint8 frames at another size, int16 audio)."""
    return get_task(task).example_batch(cfg, batch_size=batch_size, seed=seed, frame_hw=frame_hw)


def randomize_backbones_(model: nn.Module, seed: int = 0) -> None:
    """timm zero-initialises Swin-V2's res-post-norm LayerNorm weights, which makes a random
    Swin-V2 block the identity; give every frozen LayerNorm a non-trivial affine map so that
    backbone-equality tests compare real computations."""
    g = torch.Generator().manual_seed(seed)
    trunk = getattr(model, "trunk", model)
    with torch.no_grad():
        for backbone in (trunk.visual, trunk.audio):
            for m in backbone.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))


GATE_NAMES = ("out_gate", "gate", "gate_av", "cross_gate")


def open_gates_(model: nn.Module, value: float = 0.5) -> None:
    """Set every zero-initialised adapter gate to ``value`` (so adapters change the output)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in f".{name}" and name.rsplit(".", 1)[-1] in GATE_NAMES:
                p.fill_(value)


def build_tiny(task: str, seed: int = 0, **overrides):
    """(task object, cfg, model) for a tiny preset with deterministic init and a non-trivial backbone."""
    torch.manual_seed(seed)
    t = get_task(task)
    overrides.setdefault("num_segments", min(TEST_SEGMENTS, t.config(preset="tiny").num_segments))
    cfg = t.config(preset="tiny", **overrides)
    model = t.build_model(cfg)
    randomize_backbones_(model, seed)
    return t, cfg, model


def overfit_losses(task: str, steps: int, lr: float, seed: int = 0, **overrides) -> list[float]:
    """Adam on the trainable parameters over one fixed batch; the loss after every step."""
    t, cfg, model = build_tiny(task, seed, **overrides)
    batch = make_batch(task, cfg, seed=seed)
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = t.loss(model(batch), batch, cfg)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
