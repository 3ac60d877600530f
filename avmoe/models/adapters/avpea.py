"""AV-PEA adapter (Radman & Laaksonen, VISAPP 2024; related-methods.md §2). No public code.

Confirmed (abstract): a parameter-efficient adapter in each block of a frozen transformer that
exchanges audio-visual cues, with a trainable-parameter count independent of the task.

[unverified] details, as commonly described and implemented here:
* the adapter is a bottleneck (LN -> D/r -> ReLU -> D -> LN, zero-init output scale) run in
  parallel to the sub-layer, whose input is augmented by a cross-attention driven by the
  current modality's CLS token: one query, the other modality's tokens as keys and values,
  O(N) instead of O(N^2), no latent tokens;
* AV-PEA runs one shared ViT for both modalities, so no dimension mapping is needed there.

Deviations forced by this trunk (two Swin encoders, no CLS token):
* the query is the token mean of the self stream (a Swin stand-in for CLS);
* the other stream is mapped to the self width with a Linear (D_y -> D_x); tokens are not
  remapped (the single query reads any number of tokens);
* the attention is scaled by 1/sqrt(D) (standard attention; the paper's exact form is unverified);
* the cross-attention summary is broadcast to every token through a zero-init gate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avmoe.config import AdapterConfig
from avmoe.models.adapters.bridge import StreamSpec
from avmoe.models.adapters.experts import Bottleneck
from avmoe.models.registries import ADAPTERS


@ADAPTERS.register("avpea")
class AVPEAAdapter(nn.Module):
    def __init__(self, x: StreamSpec, y: StreamSpec, cfg: AdapterConfig, gate: bool):
        super().__init__()
        self.dim_map = nn.Linear(y.dim, x.dim)
        self.cross_gate = nn.Parameter(torch.zeros(1))
        self.bottleneck = Bottleneck(x.dim, cfg.reduction, cfg.groups, cfg.use_bn, relu=True)
        self.out_gate = nn.Parameter(torch.zeros(1)) if gate else None
        self.scale = 1.0 / math.sqrt(x.dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        kv = self.dim_map(y)  # (N, T_y, D_x)
        q = x.mean(1, keepdim=True)  # (N, 1, D_x): CLS stand-in
        attn = torch.softmax((q @ kv.transpose(1, 2)) * self.scale, dim=-1)
        out = self.bottleneck(x + self.cross_gate * (attn @ kv))
        return (out if self.out_gate is None else self.out_gate * out), None
