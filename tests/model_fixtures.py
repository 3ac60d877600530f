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

TASK_NAMES = ("ave", "avvp", "avs", "avqa")
TEST_SEGMENTS = {"ave": 4, "avvp": 4, "avs": 3, "avqa": 4}  # fewer than the data's 10 / 5: CPU time


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
    g = torch.Generator().manual_seed(seed)
    b, t = batch_size, cfg.num_segments
    frames = torch.randint(0, 256, (b, t, *frame_hw, 3), dtype=torch.uint8, generator=g)
    audio = (torch.randn(b, t * cfg.audio.segment_samples, generator=g) * 3000).to(torch.int16)
    tg: dict[str, torch.Tensor] = {}
    if task == "ave":
        labels = torch.randint(0, 28, (b, 1), generator=g).expand(b, t).clone()
        labels[:, 0] = 28  # one background segment per video
        tg["segment_labels"] = labels
    elif task == "avvp":
        c = cfg.num_classes
        tg["video_labels"] = (torch.rand(b, c, generator=g) > 0.85).float()
        tg["features"] = torch.randn(b, t, cfg.st_dim, generator=g)
        tg["gt_audio"] = (torch.rand(b, c, t, generator=g) > 0.9).to(torch.uint8)
        tg["gt_visual"] = (torch.rand(b, c, t, generator=g) > 0.9).to(torch.uint8)
    elif task == "avs":
        s = cfg.mask_size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        masks = torch.zeros(b, t, s, s, dtype=torch.uint8)
        for i in range(b):  # a different box per video
            masks[i, :, (yy >= 4 + 4 * i) & (yy < 20) & (xx >= 6) & (xx < 22 + 2 * i)] = 1
        tg["masks"] = masks
        valid = torch.ones(b, t, dtype=torch.bool)
        if cfg.setting == "s4":
            valid[:, 1:] = False  # S4 train: first frame only
        tg["mask_valid"] = valid
    elif task == "avqa":
        tg["question_ids"] = torch.randint(1, cfg.vocab_size, (b, cfg.max_question_len), generator=g)
        tg["question_ids"][:, -2:] = 0  # padding
        tg["answer"] = torch.arange(b) % cfg.num_answers
        tg["question_type"] = torch.arange(b) % 9
    return AVBatch(frames=frames, audio=audio, targets=tg, keys=[f"v{i}" for i in range(b)])


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
    from avmoe.tasks import get_task

    torch.manual_seed(seed)
    t = get_task(task)
    overrides.setdefault("num_segments", TEST_SEGMENTS[task])
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
