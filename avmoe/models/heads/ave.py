"""AVE head: TemporalAttention + CMBS (spec §3.1, inherited from DG-SCT).

Per video: V (T, 1536) and A (T, 768) token means -> TemporalAttention -> gated queries
V_q <- V_q (1 + 0.1 g_a), A_q <- A_q (1 + 0.1 g_v) -> CMBS:
* class activation sequences cas_v, cas_a = Linear(d -> 28); per modality the mean of the top-4
  values over time; av_score = their average (B, 28);
* F = (V_q + A_q) / 2; is_event = Linear(d -> 1)(F) (B, T) logits;
  event = Linear(d -> 28)(max_t F) + 0.3 av_score (B, 28).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from avmoe.config import TaskConfig, TemporalConfig
from avmoe.models.heads.temporal import TemporalAttention
from avmoe.models.registries import HEADS


@dataclass
class AVEConfig(TaskConfig):
    num_classes: int = 28  # + background (index 28) in the labels
    visual_dim: int = 512  # Linear(1536 -> 512) + ReLU + Dropout before the visual LSTM
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    gate_scale: float = 0.1  # V_q <- V_q (1 + 0.1 g_a)
    topk: int = 4  # CMBS top-k mean over time
    av_score_weight: float = 0.3


def topk_time_mean(cas: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, C) -> (B, C): mean of the k largest values over time (CMBS)."""
    return cas.topk(min(k, cas.shape[1]), dim=1).values.mean(1)


@HEADS.register("ave")
class AVEHead(nn.Module):
    def __init__(self, cfg: AVEConfig, trunk: nn.Module):
        super().__init__()
        d = cfg.temporal.d_model
        self.temporal_attn = TemporalAttention(
            cfg.temporal, visual_in=trunk.visual_specs[-1].dim, visual_dim=cfg.visual_dim,
            audio_in=trunk.audio_specs[-1].dim, decoders=True)
        self.video_cas = nn.Linear(d, cfg.num_classes)
        self.audio_cas = nn.Linear(d, cfg.num_classes)
        self.is_event = nn.Linear(d, 1)
        self.event_classifier = nn.Linear(d, cfg.num_classes)
        self.gate_scale, self.topk, self.av_weight = cfg.gate_scale, cfg.topk, cfg.av_score_weight

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        b, t = inputs.batch_size, inputs.num_segments
        ta = self.temporal_attn(feats.a_feat.view(b, t, -1), feats.v_feat.view(b, t, -1))
        v_q = ta["v_q"] * (1 + self.gate_scale * ta["g_a"])
        a_q = ta["a_q"] * (1 + self.gate_scale * ta["g_v"])
        video_cas, audio_cas = self.video_cas(v_q), self.audio_cas(a_q)
        av_score = (topk_time_mean(video_cas, self.topk) + topk_time_mean(audio_cas, self.topk)) / 2
        fused = (v_q + a_q) / 2
        return {
            "is_event": self.is_event(fused).squeeze(-1),
            "event_logits": self.event_classifier(fused.max(dim=1).values) + self.av_weight * av_score,
            "av_score": av_score,
            # per-modality class activation sequences (B, T, C): OGM-GE's uni-modal estimates
            "video_cas": video_cas, "audio_cas": audio_cas,
        }
