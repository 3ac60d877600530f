"""AVQA head: AVST question encoder, audio-guided grounding, match head, temporal QA (spec §3.4).

Widths follow the visual encoder's last stage (1536 for Swin-V2-L):
* question: Embedding -> tanh -> LSTM -> tanh([h ; c]) -> Linear -> q (B, D);
  the LSTM runs over the padded length as in the code (no packing);
* audio: a = Linear(D -> D)(ReLU(Linear(768 -> D)(A))) per segment;
* grounding (positive frames and negatives alike): s = softmax over positions of
  cos(tokens, a); v = Linear(2D -> D)(tanh([mean tokens ; s · L2-normalised tokens]));
* match head: MLP(2D -> 512 -> 256 -> 128 -> 2) on [a ; v] for positives (label 1) and
  negatives (label 0);
* temporal QA: q attends (MHA, 4 heads) over the grounded visual and over the audio segments,
  each + FFN residual + LN; f = tanh([att_a + mean_t a ; att_v + mean_t v]) -> Linear ->
  tanh(f ⊙ q) -> answer logits.

Negatives (documented deviation): the official sampler draws the 10 frames of a random other
video; here they are the frames of another sample of the batch, ``frames.roll(1, dims=0)``,
encoded by the frozen Swin without adapters (as the code). At batch size 1 the "negative" is the
sample itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avmoe.config import TaskConfig
from avmoe.models.registries import HEADS


@dataclass
class AVQAConfig(TaskConfig):
    vocab_size: int = 93
    num_answers: int = 42
    max_question_len: int = 14
    match_weight: float = 0.5
    match_hidden: tuple[int, ...] = (512, 256, 128)
    qa_heads: int = 4
    dropout: float = 0.1


class QuestionEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.fc = nn.Linear(2 * dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h, c) = self.lstm(torch.tanh(self.embed(ids)))
        return self.fc(torch.tanh(torch.cat([h[-1], c[-1]], dim=-1)))


class TemporalQA(nn.Module):
    """Question-guided attention over segments + residual FFN + LN (AVST)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        x = self.attn(q.unsqueeze(1), seq, seq, need_weights=False)[0].squeeze(1)
        return self.norm(x + self.drop(self.ffn(x)))


@HEADS.register("avqa")
class AVQAHead(nn.Module):
    def __init__(self, cfg: AVQAConfig, trunk: nn.Module):
        super().__init__()
        d = trunk.visual_specs[-1].dim
        self.question = QuestionEncoder(cfg.vocab_size, d)
        self.fc_a1 = nn.Linear(trunk.audio_specs[-1].dim, d)
        self.fc_a2 = nn.Linear(d, d)
        self.fc_gl = nn.Linear(2 * d, d)
        dims = (2 * d, *cfg.match_hidden, 2)
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        self.match = nn.Sequential(*layers[:-1])  # fc1..fc4, no ReLU on the logits
        self.attn_v = TemporalQA(d, cfg.qa_heads, cfg.dropout)
        self.attn_a = TemporalQA(d, cfg.qa_heads, cfg.dropout)
        self.fc_fusion = nn.Linear(2 * d, d)
        self.fc_ans = nn.Linear(d, cfg.num_answers)

    def ground(self, tokens: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """tokens (BT, N, D), audio (BT, D) -> grounded visual feature (BT, D)."""
        normed = F.normalize(tokens, dim=-1)
        s = torch.softmax((normed @ F.normalize(audio, dim=-1).unsqueeze(-1)).squeeze(-1), dim=-1)
        grounded = (s.unsqueeze(1) @ normed).squeeze(1)
        return self.fc_gl(torch.tanh(torch.cat([tokens.mean(1), grounded], dim=-1)))

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        b, t = inputs.batch_size, inputs.num_segments
        q = self.question(batch.targets["question_ids"].to(feats.v_tokens.device))
        a = self.fc_a2(F.relu(self.fc_a1(feats.a_feat)))  # (BT, D)
        v_pos = self.ground(feats.v_tokens, a)
        neg_frames = inputs.frames.view(b, t, *inputs.frames.shape[1:]).roll(1, dims=0).flatten(0, 1)
        v_neg = self.ground(trunk.frozen_visual_tokens(neg_frames), a)
        match = torch.stack([self.match(torch.cat([a, v_pos], -1)),
                             self.match(torch.cat([a, v_neg], -1))], dim=1)  # (BT, 2: pos/neg, 2)
        a_seq, v_seq = a.view(b, t, -1), v_pos.view(b, t, -1)
        f = torch.tanh(torch.cat([self.attn_a(q, a_seq) + a_seq.mean(1),
                                  self.attn_v(q, v_seq) + v_seq.mean(1)], dim=-1))
        answer = self.fc_ans(torch.tanh(self.fc_fusion(f) * q))
        # fusion_in = tanh([audio ; visual]) and the question vector: OGM-GE's concat split
        return {"answer_logits": answer, "match_logits": match, "fusion_in": f, "question": q}
