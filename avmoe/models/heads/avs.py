"""AVS head: multi-scale Swin maps, gated TemporalAttention, TPAVI, DPT-style decoder (spec §3.3).

1. Per Swin stage s, the stage output before merging (final LN at s = 3) -> Linear -> C = 256
   channels -> bicubic resize to 56, 28, 14, 7 (``map_sizes``).
2. Audio: token-mean HTS-AT feature -> Linear(768 -> 128), (B, T, 128).
3. One TemporalAttention per scale (no decoders: the code computes and discards them) on the
   average-pooled map; only its gates are used: map_s <- map_s (1 + gamma g_a^(s)),
   audio <- audio (1 + gamma mean_s g_v^(s)).
4. TPAVI (AVSBench non-local block, "dot" mode) at every scale.
5. Decoder: FeatureFusionBlocks coarse to fine (residual conv units, x2 bilinear with
   align_corners) and the output convs (C -> 128 -> x2 -> 32 -> ReLU -> 1) -> (B, T, 4*56, 4*56).

Quirk kept: the official residual conv unit applies an in-place ReLU to its input, so the
feature maps returned for the AVM loss (and the residual inside the unit) are ReLU'd; we compute
the same values without in-place ops. TPAVI evaluates theta (phi^T g) instead of
(theta phi^T) g: the same product (up to float rounding) without the THW x THW matrix.
Not built (they get no gradient): the coarsest fusion block's first residual unit, the decoders
of TemporalAttention, the unused PVT-v2-b5 / VGGish / conv1..4 of the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from avmoe.config import ConfigError, TaskConfig, TemporalConfig
from avmoe.models.heads.temporal import TemporalAttention
from avmoe.models.registries import HEADS


@dataclass
class AVSConfig(TaskConfig):
    setting: Literal["s4", "ms3"] = "s4"  # the task variant (AVSBench S4 / MS3)
    channels: int = 256  # audio is projected to temporal.audio_dim (128)
    map_sizes: tuple[int, ...] = (56, 28, 14, 7)  # mask = 4 x map_sizes[0] (224)
    decoder_mid: int = 128
    decoder_last: int = 32
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    gamma: float = 0.05  # S4 0.05 (hard-coded), MS3 0.1
    avm_weight: float = 0.0  # MS3: 0.5
    # AVM loss mask: the logits average-pooled to each map size, then the sigmoid (the official
    # A_MaskedV_SimmLoss); "sigmoid_pool" pools the probabilities instead (our former order)
    avm_mask: Literal["pool_sigmoid", "sigmoid_pool"] = "pool_sigmoid"
    eval_videos_per_batch: int | None = 4  # AVSBench test batch (metrics quirk)

    def check(self, prefix: str = "") -> None:
        if len(self.map_sizes) != 4:
            raise ConfigError(f"{prefix}map_sizes must have 4 entries (one per Swin stage)")

    @property
    def mask_size(self) -> int:
        return 4 * self.map_sizes[0]


class TPAVI(nn.Module):
    """Temporal pixel-wise audio-visual interaction (AVSBench ``TPAVIModule``, mode "dot")."""

    def __init__(self, channels: int, audio_dim: int):
        super().__init__()
        inter = channels // 2
        self.align_channel = nn.Linear(audio_dim, channels)
        self.theta = nn.Conv3d(channels, inter, 1)
        self.phi = nn.Conv3d(channels, inter, 1)
        self.g = nn.Conv3d(channels, inter, 1)
        self.W_z = nn.Sequential(nn.Conv3d(inter, channels, 1), nn.BatchNorm3d(channels))
        nn.init.zeros_(self.W_z[1].weight)  # the block starts as identity (+ LayerNorm)
        nn.init.zeros_(self.W_z[1].bias)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, T, H, W), audio (B, T, A) -> (B, C, T, H, W), aligned audio (B, T, C)."""
        b, c, t, h, w = x.shape
        a = self.align_channel(audio)
        a_map = a.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, h, w)
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, THW, C')
        phi = self.phi(a_map).flatten(2)  # (B, C', THW)
        g = self.g(x).flatten(2).transpose(1, 2)  # (B, THW, C')
        y = theta @ (phi @ g) / (t * h * w)  # == ((theta phi) / N) g
        y = y.transpose(1, 2).reshape(b, -1, t, h, w)
        z = self.W_z(y) + x
        return self.norm(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3), a


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)  # the official in-place ReLU also rectifies the residual
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, channels: int, with_skip: bool = True):
        super().__init__()
        # the coarsest block has no skip input; the code still builds its (unused) first unit
        self.res1 = ResidualConvUnit(channels) if with_skip else None
        self.res2 = ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.res1(skip)  # type: ignore[misc]
        return F.interpolate(self.res2(x), scale_factor=2, mode="bilinear", align_corners=True)


@HEADS.register("avs")
class AVSHead(nn.Module):
    def __init__(self, cfg: AVSConfig, trunk: nn.Module):
        super().__init__()
        c, da = cfg.channels, cfg.temporal.audio_dim
        self.map_sizes = tuple(cfg.map_sizes)
        self.gamma = cfg.gamma
        self.visual_proj = nn.ModuleList(nn.Linear(s.dim, c) for s in trunk.visual_specs)
        self.audio_proj = nn.Linear(trunk.audio_specs[-1].dim, da)
        self.temporal_attn = nn.ModuleList(
            TemporalAttention(cfg.temporal, visual_in=c, visual_dim=c, audio_in=None, decoders=False)
            for _ in self.map_sizes)
        self.tpavi = nn.ModuleList(TPAVI(c, da) for _ in self.map_sizes)
        self.path = nn.ModuleList(FeatureFusionBlock(c, with_skip=s < 3) for s in range(4))  # path1..path4
        self.output_conv = nn.Sequential(
            nn.Conv2d(c, cfg.decoder_mid, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(cfg.decoder_mid, cfg.decoder_last, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cfg.decoder_last, 1, 1),
        )

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        b, t = inputs.batch_size, inputs.num_segments
        maps = [
            F.interpolate(proj(x).permute(0, 3, 1, 2), size=(m, m), mode="bicubic", align_corners=False)
            for proj, x, m in zip(self.visual_proj, feats.v_stages, self.map_sizes)
        ]  # (BT, C, m, m)
        audio = self.audio_proj(feats.a_feat).view(b, t, -1)
        g_v = []
        for s, ta in enumerate(self.temporal_attn):
            gates = ta(audio, maps[s].mean((2, 3)).view(b, t, -1))
            maps[s] = maps[s] * (1 + self.gamma * gates["g_a"].reshape(b * t, 1, 1, 1))
            g_v.append(gates["g_v"])
        audio = audio * (1 + self.gamma * torch.stack(g_v).mean(0))
        a_feats = []
        for s, tpavi in enumerate(self.tpavi):
            _, c, h, w = maps[s].shape
            x, a = tpavi(maps[s].view(b, t, c, h, w).transpose(1, 2), audio)
            maps[s] = x.transpose(1, 2).reshape(b * t, c, h, w)
            a_feats.append(a.reshape(b * t, -1))
        x = self.path[3](maps[3])
        for s in (2, 1, 0):
            x = self.path[s](x, maps[s])
        logits = self.output_conv(x)  # (BT, 1, 4 m0, 4 m0)
        return {
            "mask_logits": logits.view(b, t, *logits.shape[-2:]),
            "v_maps": [F.relu(m) for m in maps],  # as the in-place ReLU leaves them (AVM loss)
            "a_feats": a_feats,
        }
