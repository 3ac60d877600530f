"""The full model a task builds: on-device preprocessing -> shared trunk -> task head.

``forward(batch)`` returns the head's tensors plus ``"lb_loss"`` (the unweighted load-balancing
loss reduced over the MoE adapters; 0 without routers). Only adapters and head are trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from avmoe.batch import AVBatch
from avmoe.config import TaskConfig
from avmoe.models import heads as _heads  # noqa: F401  (registers the heads)
from avmoe.models.preprocess import AVPreprocessor
from avmoe.models.registries import HEADS
from avmoe.models.trunk import AVTrunk


class AVModel(nn.Module):
    """``head``: a head class (``factory(cfg, trunk)``) or its ``HEADS`` name (default: the
    config's task name)."""

    def __init__(self, cfg: TaskConfig, head=None):
        super().__init__()
        cfg.validate()
        self.preprocess = AVPreprocessor(cfg.visual.img_size, cfg.visual.mean, cfg.visual.std,
                                         cfg.audio.segment_samples, cfg.visual.antialias)
        self.trunk = AVTrunk(cfg.visual, cfg.audio, cfg.adapter, cfg.backbone_train_mode)
        factory = head if callable(head) else HEADS.get(head or cfg.task)
        self.head = factory(cfg, self.trunk)

    def forward(self, batch: AVBatch) -> dict[str, torch.Tensor]:
        inputs = self.preprocess(batch)
        feats = self.trunk(inputs.frames, inputs.audio)
        out = self.head(feats, inputs, batch, self.trunk)
        out["lb_loss"] = feats.lb_loss
        return out

    def router_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per MoE adapter: mean routing weight (E,) and argmax counts (E,) since the last reset."""
        return self.trunk.router_stats()

    def reset_router_stats(self) -> None:
        self.trunk.reset_router_stats()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the frozen backbone blocks in backward (adapted pairs and unpaired blocks a
        gradient flows through), restoring the adapters' buffers so nothing is counted twice:
        memory for the paper model on a GPU (avmoe/models/trunk.py, bench/gpu.py)."""
        self.trunk.grad_checkpointing = enable

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
