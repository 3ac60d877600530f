"""Frozen visual encoder: timm Swin-Transformer-V2 (default ``swinv2_large_window12_192``).

The model is built with ``pretrained=False`` and ``num_classes=0`` (the official code keeps
timm's unused 21,841-way ImageNet-22K classifier, ~33.5 M parameters; we do not build it), then
loaded from a local file with timm's own ``checkpoint_filter_fn`` (which also converts the
original Microsoft / timm-0.6 layout, where patch merging sits at the end of stages 0-2, to
timm 1.x, where it sits at the start of stages 1-3). Loading through timm's
``pretrained_cfg_overlay=dict(file=...)`` gives the same tensors (tested).

The trunk does not call ``forward_features``: it iterates ``stages`` / ``blocks`` itself to
insert adapters (``avmoe/models/trunk.py``); ``forward_frozen`` is the untouched reference.
"""

from __future__ import annotations

import timm
import torch
from timm.models import swin_transformer_v2 as tv2
from torch import nn

from avmoe.config import VisualConfig
from avmoe.models.backbones.weights import load_checked, read_state_dict
from avmoe.models.registries import BACKBONES


def load_swin_weights(model: nn.Module, path: str) -> None:
    """Load a local Swin-V2 checkpoint (timm 1.x or original layout) into ``model``; the
    classifier keys are dropped, any missing or mis-shaped backbone key raises."""
    sd = tv2.checkpoint_filter_fn(read_state_dict(path), model)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    load_checked(model, sd, what=f"Swin-V2 weights {path}")


@BACKBONES.register("swinv2")
class SwinV2Visual(nn.Module):
    """timm Swin-V2 with the accessors the paired-block loop needs."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        arch = {k: getattr(cfg, k) for k in ("embed_dim", "depths", "num_heads", "window_size")
                if getattr(cfg, k) is not None}
        self.model = timm.create_model(
            cfg.name, pretrained=False, num_classes=0, img_size=cfg.img_size,
            drop_path_rate=cfg.drop_path_rate, **arch,
        )
        if cfg.weights:
            load_swin_weights(self.model, cfg.weights)

    @property
    def stages(self) -> nn.Sequential:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, h, w, C) patch tokens."""
        return self.model.patch_embed(x)

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: timm's own forward_features, (N, h, w, C) after the final norm."""
        return self.model.forward_features(x)
