"""AVVP head: MGN (Multimodal Grouping Network), as in DG-SCT/AVMoE (spec §3.2).

x_a = Linear(768 -> d)(A); x_v = Linear(2d -> d)([Linear(1536 -> d)(V) ; Linear(512 -> d)(R(2+1)D)]);
25 zero-init class tokens per modality; class-aware uni-modal grouping (visual; audio with the
HAN-style block fed by x_v), cross-modal grouping of [g_a ; g_v]; sigmoid heads give the video
probability p_av (B, C), modality probabilities p_a, p_v (B, C) and frame probabilities
P = p ⊙ soft map (B, T, C); fc_cls(class tokens) gives the class-token logits (C, C).

Batch size: the official code reshapes frames as (1, B*T, D) and only runs at B = 1; here the
video axis is kept, so any B works (the grouping is per video).
Init: trunc-normal(0.02) Linears and (1, 0) LayerNorms over the whole head (the code applies it
to the head before building the backbones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn

from avmoe.config import TaskConfig
from avmoe.models.heads.grouping import ModalityTrans
from avmoe.models.registries import HEADS


@dataclass
class AVVPConfig(TaskConfig):
    num_classes: int = 25
    dim: int = 128
    st_dim: int = 512  # R(2+1)D-18 clip features
    depth_vis: int = 3
    depth_aud: int = 3
    depth_av: int = 6
    num_heads: int = 8
    drop_path: float = 0.1
    audio_target_scale: float = 1.0  # Pa = a*y + (1-a)*0.5
    visual_target_scale: float = 0.9  # Pv = 0.9 y + 0.05 (label smoothing on the visual target)
    clamp_eps: float = 1e-7


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@HEADS.register("avvp")
class AVVPHead(nn.Module):
    def __init__(self, cfg: AVVPConfig, trunk: nn.Module):
        super().__init__()
        d, c = cfg.dim, cfg.num_classes
        self.fc_a = nn.Linear(trunk.audio_specs[-1].dim, d)
        self.fc_v = nn.Linear(trunk.visual_specs[-1].dim, d)
        self.fc_st = nn.Linear(cfg.st_dim, d)
        self.fc_fusion = nn.Linear(2 * d, d)
        self.audio_token = nn.Parameter(torch.zeros(c, d))
        self.visual_token = nn.Parameter(torch.zeros(c, d))
        common = dict(dim=d, heads=cfg.num_heads, drop_path=cfg.drop_path, num_groups=c)
        # soft uni- and cross-modal assignment (the released scripts' 'soft')
        self.audio_cug = ModalityTrans(depth=cfg.depth_aud, hard=False, han_tokens=cfg.num_segments, **common)
        self.visual_cug = ModalityTrans(depth=cfg.depth_vis, hard=False, **common)
        self.av_mcg = ModalityTrans(depth=cfg.depth_av, hard=False, **common)
        self.fc_prob = nn.Linear(d, 1)
        self.fc_prob_a = nn.Linear(d, 1)
        self.fc_prob_v = nn.Linear(d, 1)
        self.fc_cls = nn.Linear(d, c)
        self.num_segments = cfg.num_segments  # the HAN block's token MLP is sized by it
        self.apply(_init)

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        b, t = inputs.batch_size, inputs.num_segments
        if t != self.num_segments:
            raise ValueError(f"the AVVP head is built for {self.num_segments} segments, the batch has {t}")
        st = batch.targets["features"].to(feats.v_tokens.device, torch.float32)
        x_a = self.fc_a(feats.a_feat.view(b, t, -1))
        x_v = self.fc_fusion(torch.cat([self.fc_v(feats.v_feat.view(b, t, -1)), self.fc_st(st)], dim=-1))
        g_v, maps_v = self.visual_cug(x_v, self.visual_token)
        g_a, maps_a = self.audio_cug(x_a, self.audio_token, x_v)
        g_av, _ = self.av_mcg(g_a, g_v)
        p_a = torch.sigmoid(self.fc_prob_a(g_a))  # (B, C, 1)
        p_v = torch.sigmoid(self.fc_prob_v(g_v))
        return {
            "video_prob": torch.sigmoid(self.fc_prob(g_av)).squeeze(-1),  # (B, C)
            "audio_prob": p_a.squeeze(-1),
            "visual_prob": p_v.squeeze(-1),
            "audio_frame_prob": (p_a * maps_a["soft"]).transpose(1, 2),  # (B, T, C)
            "visual_frame_prob": (p_v * maps_v["soft"]).transpose(1, 2),
            "audio_cls_logits": self.fc_cls(self.audio_token),  # (C, C)
            "visual_cls_logits": self.fc_cls(self.visual_token),
        }
