"""The experts of an AVMoE adapter and their shared parts (spec §2.4-§2.6).

* :class:`Bottleneck`: LN_before -> grouped 1x1 Down (D -> D/r, no bias) -> [BN] -> [ReLU]
  -> grouped 1x1 Up -> [BN] -> LN_post. The code's ``Conv2d(.., 1, groups=G)`` on (B, D, N, 1)
  is a ``Conv1d(.., 1, groups=G)`` on (B, D, N) here: same weights, same init, same BN
  statistics (over batch x tokens).
* :class:`TokenCompression`: K latent tokens (U[0,1) init, as ``torch.rand`` in the code)
  gather from a source, L' = L + softmax(L S^T) S; the stream reads them back through a zero-init
  scalar gate, X + g * softmax(X L'^T) L'. Unscaled dot products, no projections (LAVisH).
* :class:`CrossModalExpert` (CMA): compression of the bridged guide Ŷ, fused into X, then the
  bottleneck with ReLU, times the zero-init output gate g (if the adapter is gated).
* :class:`UnimodalExpert` (UA): an attention variant on X alone, then the bottleneck **without**
  ReLU (the code's UA has none; ``ua_relu=True`` adds it). Variants: "v2" (canonical: own
  latents, token compression of X), "none" (AVE/AVQA scripts), "paramfree" (AVVP: X + g S^T X
  with S = softmax(X X^T), O(N^2) memory), "v1" (AVS-S4: 4-head MHA with dropout 0.2 that
  *replaces* X, no residual). The v1 attention axis (``mha_axis``): "tokens" attends over the
  tokens of each frame (self-attention within a frame, the paper's reading); "frames" is what the
  official code computes: its ``nn.MultiheadAttention`` has no ``batch_first``, so the (B*T, N, D)
  input is read as (L=B*T, batch=N, D) and each token position attends across the B*T frames of
  the micro-batch (across videos; the result depends on what else is in the batch).

With a zero output gate every expert returns exactly 0 (finite x 0), which is what makes the
adapted trunk equal to the frozen one at initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avmoe.config import AdapterConfig


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(q k^T [* scale]) v over the last two axes."""
    logits = q @ k.transpose(-1, -2)
    if scale is not None:
        logits = logits * scale
    return torch.softmax(logits, dim=-1) @ v


class Bottleneck(nn.Module):
    def __init__(self, dim: int, reduction: int, groups: int, use_bn: bool, relu: bool):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1 or dim % groups or hidden % groups:
            raise ValueError(f"bottleneck dim {dim} / r={reduction} = {hidden} must be divisible "
                             f"by groups={groups}")
        self.ln_before = nn.LayerNorm(dim)
        self.down = nn.Conv1d(dim, hidden, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden) if use_bn else nn.Identity()
        self.act = nn.ReLU() if relu else nn.Identity()
        self.up = nn.Conv1d(hidden, dim, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm1d(dim) if use_bn else nn.Identity()
        self.ln_post = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_before(x).transpose(1, 2)  # (B, D, N)
        h = self.bn2(self.up(self.act(self.bn1(self.down(h)))))
        return self.ln_post(h.transpose(1, 2))


class TokenCompression(nn.Module):
    def __init__(self, dim: int, num_tokens: int, scaled: bool = False):
        super().__init__()
        self.latents = nn.Parameter(torch.rand(num_tokens, dim))
        self.gate = nn.Parameter(torch.zeros(1))  # g_av / g_self
        self.scale = 1.0 / math.sqrt(dim) if scaled else None

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        lat = lat + attend(lat, source, source, self.scale)
        return x + self.gate * attend(x, lat, lat, self.scale)


class _GatedExpert(nn.Module):
    def __init__(self, gate: bool):
        super().__init__()
        self.out_gate = nn.Parameter(torch.zeros(1)) if gate else None

    def _gated(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.out_gate is None else self.out_gate * out


class CrossModalExpert(_GatedExpert):
    def __init__(self, dim: int, cfg: AdapterConfig, gate: bool):
        super().__init__(gate)
        self.compress = TokenCompression(dim, cfg.num_tokens, cfg.attn_scale)
        self.bottleneck = Bottleneck(dim, cfg.reduction, cfg.groups, cfg.use_bn, relu=True)

    def forward(self, x: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        return self._gated(self.bottleneck(self.compress(x, y_hat)))


class UnimodalExpert(_GatedExpert):
    def __init__(self, dim: int, cfg: AdapterConfig, gate: bool):
        super().__init__(gate)
        self.variant = cfg.ua_variant
        self.scale = 1.0 / math.sqrt(dim) if cfg.attn_scale else None
        if self.variant == "v2":
            self.compress = TokenCompression(dim, cfg.num_tokens, cfg.attn_scale)
        elif self.variant == "paramfree":
            self.gate_av = nn.Parameter(torch.zeros(1))
        elif self.variant == "v1":
            # one module either way (same parameters): only the axis it reads as the sequence differs
            self.mha = nn.MultiheadAttention(dim, cfg.mha_heads, dropout=cfg.mha_dropout,
                                             batch_first=cfg.mha_axis == "tokens")
        elif self.variant != "none":
            raise ValueError(f"unknown unimodal expert variant {self.variant!r}")
        self.bottleneck = Bottleneck(dim, cfg.reduction, cfg.groups, cfg.use_bn, relu=cfg.ua_relu)

    def forward(self, x: torch.Tensor, y_hat: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant == "v2":
            x = self.compress(x, x)
        elif self.variant == "paramfree":
            # the code applies the row-softmaxed X X^T by columns: x_i + g Σ_j S_ji x_j
            s = torch.softmax(self._logits(x), dim=-1)
            x = x + self.gate_av * (s.transpose(1, 2) @ x)
        elif self.variant == "v1":
            x = self.mha(x, x, x, need_weights=False)[0]
        return self._gated(self.bottleneck(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ x.transpose(1, 2)
        return logits if self.scale is None else logits * self.scale
