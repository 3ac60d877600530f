"""CMG heads on the frozen trunk: the pre-training model (semantic + specific encoders, shared
codebook, decoders, Cross-CPC) and the downstream classifier over one modality's codes.

Inputs are the trunk's per-second features (``feats.v_feat`` / ``feats.a_feat``: the token mean
of each frame / each second of audio). See avmoe/models/cmg.py for the modules and
avmoe/tasks/cmg.py for the losses, the per-batch codebook updates and the protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from avmoe.config import ConfigError, TaskConfig
from avmoe.models.cmg import (CrossCodebook, CrossCPC, SemanticEncoder, SpecificEncoder, VectorDecoder,
                              cmcm_loss)

# AVE -> AVVP: the 12 LLP classes whose AVE counterpart exists (by name; CMG's
# AVE_AVVP_Categories.txt is not public): LLP class -> the AVE classes mapped onto it
AVE_AVVP_SHARED: dict[str, tuple[str, ...]] = {
    "Speech": ("Male speech, man speaking", "Female speech, woman speaking"),
    "Dog": ("Bark",),
    "Cat": ("Cat",),
    "Frying_(food)": ("Frying (food)",),
    "Chainsaw": ("Chainsaw",),
    "Banjo": ("Banjo",),
    "Violin_fiddle": ("Violin, fiddle",),
    "Accordion": ("Accordion",),
    "Motorcycle": ("Motorcycle",),
    "Helicopter": ("Helicopter",),
    "Acoustic_guitar": ("Acoustic guitar",),
    "Baby_cry_infant_cry": ("Baby cry, infant cry",),
}


@dataclass
class CMGConfig(TaskConfig):
    """CMG model config. Defaults = the released code (related-methods.md §3)."""

    stage: Literal["pretrain", "downstream"] = "pretrain"
    trunk_seed: int = 0  # draws any randomly initialised frozen trunk weights (pre-training = downstream)
    # encoders and codebook
    code_dim: int = 256
    codebook_size: int = 400
    specific_dim: int = 256
    heads: int = 4
    ffn: int = 1024
    layers: int = 2
    dropout: float = 0.1
    # MM-EMA: "code" = 0.5 own + 0.5 time-aligned other modality, audio step then video step;
    # "paper" = Eq. 7 (other modality's cross-attention summary, one joint step); "none" = each
    # modality's own vectors only (the ablation "w/o MM-EMA")
    mm_ema: Literal["code", "paper", "none"] = "code"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    commit_beta: float = 0.25  # the code: 2 beta x own code + beta x the other modality's code
    code_reset: bool = True
    reset_after: int = 300  # batches a code may stay unused
    reset_pool: int = 100  # a replacement is a code used within this many batches
    reset_noise: float = 1.0 / 1024
    # Cross-CPC
    cpc_context: int = 256
    cpc_layers: int = 2
    cpc_self_weight: float = 0.1
    # CLUB (its own optimiser: Adam(club_lr), club_iters maximum-likelihood steps per batch)
    club_hidden: int = 256
    club_iters: int = 5
    club_lr: float = 1e-3
    # loss weights (0 switches a term off); cmcm's 0.5 is the code's
    recon_weight: float = 1.0
    commit_weight: float = 1.0
    cpc_weight: float = 1.0
    club_weight: float = 1.0
    cmcm_weight: float = 0.5
    # downstream (stage=downstream)
    protocol: Literal["ave", "avvp", "ave_avvp"] = "ave"
    direction: Literal["v2a", "a2v"] = "v2a"  # v2a: train on video codes, test on audio codes
    pretrained: str | None = None  # the pre-training checkpoint (a run is resolved to its best)
    num_classes: int = 28  # the training shards' classes (AVE 28, LLP 25); ave_avvp uses the 12 shared
    # AVE class index -> index among the 12 classes AVE shares with LLP, -1 if none (from the AVE manifest)
    ave_to_shared: tuple[int, ...] = ()
    head_dim: int = 256

    def check(self, prefix: str = "") -> None:
        for name in ("code_dim", "codebook_size", "specific_dim", "heads", "ffn", "layers", "reset_after",
                     "reset_pool", "cpc_context", "cpc_layers", "club_hidden", "head_dim", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}{name} must be >= 1; got {getattr(self, name)}")
        if self.club_iters < 0:
            raise ConfigError(f"{prefix}club_iters must be >= 0; got {self.club_iters}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{prefix}ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.code_dim % self.heads:
            raise ConfigError(f"{prefix}code_dim={self.code_dim} must be divisible by heads={self.heads}")
        if self.stage == "pretrain" and self.num_segments < 3 and self.cpc_weight:
            raise ConfigError(f"{prefix}num_segments: Cross-CPC needs at least 3 segments; got "
                              f"{self.num_segments} (or set cpc_weight=0)")

    @property
    def train_modality(self) -> str:
        return "visual" if self.direction == "v2a" else "audio"

    @property
    def test_modality(self) -> str:
        return "audio" if self.direction == "v2a" else "visual"

    @property
    def segment_level(self) -> bool:
        """AVVP-style per-segment multi-label output (with a background column)."""
        return self.protocol in ("avvp", "ave_avvp")


def trunk_fingerprint(trunk: nn.Module) -> torch.Tensor:
    """A number that changes with any frozen trunk weight (a downstream model must sit on the
    very trunk its codes were learnt on)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(p for p in trunk.parameters() if not p.requires_grad):
        w = p.detach().flatten()
        w = w[::max(1, w.numel() // 4096)].double()  # a sample of each tensor is enough to tell trunks apart
        total += (w * torch.linspace(1, 2, w.numel(), dtype=torch.float64)).sum() * (1 + i % 7)
    return total


class CMGEncoder(nn.Module):
    """What pre-training learns and downstream reuses frozen: semantic + specific encoders and the
    codebook. ``semantic(v, a)`` -> (z_v, z_a); ``codes(z)`` -> (indices, code vectors, STE)."""

    def __init__(self, cfg: CMGConfig, v_in: int, a_in: int):
        super().__init__()
        sem = dict(dim=cfg.code_dim, heads=cfg.heads, ffn=cfg.ffn, layers=cfg.layers, dropout=cfg.dropout)
        self.sem_v = SemanticEncoder(v_in, **sem)
        self.sem_a = SemanticEncoder(a_in, **sem)
        self.spe_v = SpecificEncoder(v_in, cfg.specific_dim)
        self.spe_a = SpecificEncoder(a_in, cfg.specific_dim)
        self.codebook = CrossCodebook(cfg.codebook_size, cfg.code_dim)


def _inputs(feats, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    b, t = inputs.batch_size, inputs.num_segments
    return feats.v_feat.reshape(b, t, -1), feats.a_feat.reshape(b, t, -1)


class CMGPretrainHead(nn.Module):
    def __init__(self, cfg: CMGConfig, trunk: nn.Module):
        super().__init__()
        v_in, a_in = trunk.visual_specs[-1].dim, trunk.audio_specs[-1].dim
        self.encoder = CMGEncoder(cfg, v_in, a_in)
        self.dec_v = VectorDecoder(cfg.code_dim, cfg.specific_dim, v_in)
        self.dec_a = VectorDecoder(cfg.code_dim, cfg.specific_dim, a_in)
        self.cpc = CrossCPC(cfg.code_dim, cfg.cpc_context, cfg.cpc_layers, self_weight=cfg.cpc_self_weight)
        self.register_buffer("trunk_fingerprint", trunk_fingerprint(trunk))
        self.cfg = cfg

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        cfg, enc = self.cfg, self.encoder
        v, a = _inputs(feats, inputs)
        z_v, z_a = enc.sem_v(v), enc.sem_a(a)
        idx_v, e_v, q_v = enc.codebook.quantize(z_v)
        idx_a, e_a, q_a = enc.codebook.quantize(z_a)
        out = {"z_v": z_v, "z_a": z_a, "q_v": q_v, "q_a": q_a, "idx_v": idx_v, "idx_a": idx_a}
        s_v, s_a = enc.spe_v(v), enc.spe_a(a)
        beta = cfg.commit_beta
        out.update({
            "s_v": s_v, "s_a": s_a,
            "recon_v": F.mse_loss(self.dec_v(q_v, s_v), v.detach()),
            "recon_a": F.mse_loss(self.dec_a(q_a, s_a), a.detach()),
            # the code: 2 beta ||z - sg(own code)||^2 + beta ||z - sg(the other modality's code at (b, t))||^2
            "commit_a": 2 * beta * F.mse_loss(z_a, e_a) + beta * F.mse_loss(z_a, e_v),
            "commit_v": 2 * beta * F.mse_loss(z_v, e_v) + beta * F.mse_loss(z_v, e_a),
            "cmcm": cmcm_loss(z_a, z_v, enc.codebook.embedding) if cfg.cmcm_weight else z_a.new_zeros(()),
        })
        if cfg.cpc_weight:
            out["cpc"], accs = self.cpc(z_v, z_a)
            out.update({f"cpc_acc_{k}": torch.tensor(v) for k, v in accs.items()})
        else:
            out["cpc"] = z_a.new_zeros(())
        return out


class CMGDownstreamHead(nn.Module):
    """A small classifier on one modality's codes (the encoder frozen, in eval mode): AVE
    Linear(D, D) -> max over time -> Linear(D, C) (the code's ``Semantic_Decoder``); AVVP and AVE->AVVP
    per segment Linear(D, D) -> Linear(D, C + 1) (``Semantic_Decoder_AVVP``), with the learnable
    per-class weights of the code's ExpLogLoss. Applied to both modalities' codes: the training
    modality's logits train it, the other's test it."""

    def __init__(self, cfg: CMGConfig, trunk: nn.Module):
        super().__init__()
        v_in, a_in = trunk.visual_specs[-1].dim, trunk.audio_specs[-1].dim
        self.encoder = CMGEncoder(cfg, v_in, a_in)
        self.encoder.requires_grad_(False)
        self.register_buffer("trunk_fingerprint", trunk_fingerprint(trunk))
        n_out = ((len(AVE_AVVP_SHARED) if cfg.protocol == "ave_avvp" else cfg.num_classes) + 1
                 if cfg.segment_level else cfg.num_classes)
        self.fc1 = nn.Linear(cfg.code_dim, cfg.head_dim)
        self.fc2 = nn.Linear(cfg.head_dim, n_out)
        self.alpha = nn.Parameter(torch.full((n_out,), 0.1)) if cfg.segment_level else None
        self.segment_level = cfg.segment_level

    def train(self, mode: bool = True) -> "CMGDownstreamHead":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout in the codes (the code leaves it on)
        return self

    def classify(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.fc1(codes)
        return self.fc2(h) if self.segment_level else self.fc2(h.max(1).values)

    def forward(self, feats, inputs, batch, trunk) -> dict[str, torch.Tensor]:
        enc = self.encoder
        v, a = _inputs(feats, inputs)
        with torch.no_grad():
            idx_v = enc.codebook.nearest(enc.sem_v(v))
            idx_a = enc.codebook.nearest(enc.sem_a(a))
            c_v, c_a = enc.codebook.lookup(idx_v).to(v.dtype), enc.codebook.lookup(idx_a).to(a.dtype)
        out = {"logits_visual": self.classify(c_v), "logits_audio": self.classify(c_a), "idx_v": idx_v,
               "idx_a": idx_a}
        if self.alpha is not None:
            out["alpha"] = self.alpha  # the ExpLogLoss class weights (learnt with the head)
        return out
