"""AV-PEA adapter (Radman & Laaksonen, VISAPP 2024; related-methods.md §2). No public code.

Confirmed (abstract): a parameter-efficient adapter in each block of a frozen transformer that
exchanges audio-visual cues, with a trainable-parameter count independent of the task.

[unverified] details, as commonly described and implemented here:
* the adapter is a bottleneck (LN -> D/r -> ReLU -> D -> LN, zero-init output scale) run in
  parallel to the sub-layer, whose input is augmented by a cross-attention driven by the
  current modality's CLS token: one query, the other modality's tokens as keys and values,
  O(N) instead of O(N^2), no latent tokens;
* AV-PEA runs one shared ViT for both modalities, so no dimension mapping is needed there.

Coverage: the paper adapts every block of its ViT, so ``kind="avpea"`` adapts every paired
block of this trunk (12 of 12 with Swin-V2-L + HTS-AT) whatever the preset's ``num_skip`` (an
MoE script setting; the AVE / AVS presets skip stages 1 and 3); ``avpea_coverage="num_skip"``
follows ``num_skip`` instead (8 of 12 there, the former default); ``adapted_stages`` overrides
both. The unpaired Swin blocks of stage 2 get no adapter (there is no audio block beside them).

Deviations forced by this trunk (two Swin encoders, no CLS token):
* the query is the token mean of the self stream (a Swin stand-in for CLS);
* the other stream is brought to the self width (AV-PEA's single ViT has one width and needs no
  mapping). ``avpea_map="linear"``: a learned Linear (D_y -> D_x), 78-94 % of each adapter's
  parameters in the paper model (D_y = D_x / 2 for the visual adapters, 2 D_x for the audio
  ones, against a D^2 / (r G)-sized bottleneck); ``"resample"``: parameter-free, adjacent
  channels averaged (D_y > D_x) or repeated (D_y < D_x) by adaptive average pooling over the
  channel axis, so the adapter is its bottleneck and two gates. Tokens are not remapped (the
  single query reads any number of tokens);
* the attention is scaled by 1/sqrt(D) (standard attention; the paper's exact form is unverified);
* the cross-attention summary is broadcast to every token through a zero-init gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avmoe.config import AdapterConfig
from avmoe.models.adapters.bridge import StreamSpec
from avmoe.models.adapters.experts import Bottleneck
from avmoe.models.registries import ADAPTERS


class ChannelResample(nn.Module):
    """(N, T, D_in) -> (N, T, D_out) without parameters: adaptive average pooling over channels
    (contiguous groups averaged when shrinking, channels repeated when growing)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] == self.out_dim:
            return y
        return F.adaptive_avg_pool1d(y, self.out_dim)


@ADAPTERS.register("avpea")
class AVPEAAdapter(nn.Module):
    def __init__(self, x: StreamSpec, y: StreamSpec, cfg: AdapterConfig, gate: bool):
        super().__init__()
        self.dim_map = nn.Linear(y.dim, x.dim) if cfg.avpea_map == "linear" else ChannelResample(x.dim)
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
