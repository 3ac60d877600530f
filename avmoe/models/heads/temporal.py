"""CMRAN/DG-SCT "TemporalAttention": the audio-visual temporal encoder of the AVE and AVS heads.

One module for both tasks (spec §3.1 steps 2-6, §3.3 step 3):

1. inputs: audio (B, T, audio_in) -> [Linear -> audio_dim] (AVE; AVS feeds audio_dim already);
   visual (B, T, visual_in) -> Linear -> visual_dim -> ReLU -> Dropout(0.2);
2. bi-LSTMs: audio audio_dim -> 2 x audio_dim, visual visual_dim -> 2 x d_model;
3. intra-modal encoders (Linear -> d_model, post-norm transformer encoder layers) -> A_kv, V_kv;
4. cross-modal decoders (optional; AVS computes and discards them in the official code, so it
   does not build them here): the query cross-attends to memory = [other kv ; query] along
   time, residual + LN, FFN + residual + LN. A_q = Dec(audio LSTM, V_kv), V_q = Dec(visual LSTM,
   A_kv). The official decoder layer also instantiates an unused self-attention; not built;
5. gates g_a = sigmoid(Linear(A_kv)), g_v = sigmoid(Linear(V_kv)), each (B, T, 1).

Tensors are batch-first throughout (the code is time-first; same computation).
"""

from __future__ import annotations

import torch
from torch import nn

from avmoe.config import TemporalConfig


class IntraModalEncoder(nn.Module):
    """CMRAN InternalTemporalRelationModule: Linear(in -> d) + post-norm encoder layers."""

    def __init__(self, in_dim: int, cfg: TemporalConfig):
        super().__init__()
        self.proj = nn.Linear(in_dim, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ffn, cfg.dropout,
                                           activation="relu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.enc_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.proj(x))


class CrossModalDecoder(nn.Module):
    """CMRAN CrossModalRelationAttModule with its single DecoderLayer."""

    def __init__(self, in_dim: int, cfg: TemporalConfig):
        super().__init__()
        d = cfg.d_model
        self.proj = nn.Linear(in_dim, d)
        self.cross_attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.proj(query)
        mem = torch.cat([memory, q], dim=1)
        q = self.norm1(q + self.drop1(self.cross_attn(q, mem, mem, need_weights=False)[0]))
        return self.norm2(q + self.drop2(self.ffn(q)))


class TemporalAttention(nn.Module):
    def __init__(self, cfg: TemporalConfig, visual_in: int, visual_dim: int,
                 audio_in: int | None = None, decoders: bool = True):
        super().__init__()
        d, da = cfg.d_model, cfg.audio_dim
        self.audio_proj = nn.Linear(audio_in, da) if audio_in is not None else nn.Identity()
        self.visual_proj = nn.Sequential(nn.Linear(visual_in, visual_dim), nn.ReLU(), nn.Dropout(cfg.input_dropout))
        self.audio_rnn = nn.LSTM(da, da, batch_first=True, bidirectional=True)
        self.visual_rnn = nn.LSTM(visual_dim, d, batch_first=True, bidirectional=True)
        self.audio_encoder = IntraModalEncoder(2 * da, cfg)
        self.video_encoder = IntraModalEncoder(2 * d, cfg)
        self.audio_decoder = CrossModalDecoder(2 * da, cfg) if decoders else None
        self.video_decoder = CrossModalDecoder(2 * d, cfg) if decoders else None
        self.audio_gate = nn.Linear(d, 1)
        self.video_gate = nn.Linear(d, 1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """audio (B, T, audio_in or audio_dim), visual (B, T, visual_in) -> dict of (B, T, .)."""
        a_seq, _ = self.audio_rnn(self.audio_proj(audio))
        v_seq, _ = self.visual_rnn(self.visual_proj(visual))
        a_kv, v_kv = self.audio_encoder(a_seq), self.video_encoder(v_seq)
        out = {"a_kv": a_kv, "v_kv": v_kv,
               "g_a": torch.sigmoid(self.audio_gate(a_kv)), "g_v": torch.sigmoid(self.video_gate(v_kv))}
        if self.audio_decoder is not None:
            out["a_q"] = self.audio_decoder(a_seq, v_kv)
            out["v_q"] = self.video_decoder(v_seq, a_kv)
        return out
