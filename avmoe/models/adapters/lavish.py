"""LAVisH-style adapter (related-methods.md §4): one latent-token cross-modal adapter, no router.

It is the AVMoE CMA expert on its own: K latents gather from the (bridged) other stream, the
stream reads them back through a zero-init gate, then LN -> grouped Down -> ReLU -> Up -> LN
times a zero-init output gate. LAVisH shares one frozen ViT between the modalities, so its
guide needs no mapping; with two encoders of different widths we keep the bridge (by default the
dense one, as DG-SCT/AVMoE's LAVisH baseline scripts do; ``bridge="linear"`` is closest to LAVisH).
"""

from __future__ import annotations

import torch
from torch import nn

from avmoe.config import AdapterConfig
from avmoe.models.adapters.bridge import ModalityBridge, StreamSpec
from avmoe.models.adapters.experts import CrossModalExpert
from avmoe.models.registries import ADAPTERS


@ADAPTERS.register("lavish")
class LavishAdapter(nn.Module):
    def __init__(self, x: StreamSpec, y: StreamSpec, cfg: AdapterConfig, gate: bool):
        super().__init__()
        self.bridge = ModalityBridge(x, y, cfg.bridge)
        self.expert = CrossModalExpert(x.dim, cfg, gate)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.expert(x, self.bridge(y)), None
