"""CMG / Uni-Code (Xia et al., "Achieving Cross Modal Generalization with Multimodal Unified
Representation", NeurIPS 2023): a discrete code space shared by audio and video.

The modules follow the released code (haihuangcode/CMG ``code/src/model/main_model_2.py``,
``CPC.py``, ``CLUB.py``; ../shared/spec/related-methods.md §3), on *our* inputs: the per-second
features of the frozen trunk (Swin-V2 token mean per frame, HTS-AT token mean per second)
instead of VGG19 7x7x512 maps and VGGish vectors.

* ``SemanticEncoder`` (the code's InternalTemporalRelationModule): Linear(in -> D), then 2 post-norm
  Transformer encoder layers (4 heads, FFN 1024, dropout 0.1, ReLU) over the T seconds, no
  positional encoding; both layers start from the same initial weights, as the code's
  ``_get_clones`` deep-copies one initialised layer.
* ``SpecificEncoder``: ReLU(Linear(in -> S)), the code's audio-specific encoder, for both
  modalities (the code's video-specific conv stack needs a 7x7 map; our trunk gives vectors).
* ``CrossCodebook``: M x D codes (400 x 256), U(+-1/M) init, EMA statistics as buffers
  (``ema_count``, ``ema_weight``), the idle counters of the code reset (``unused``). Nearest code
  by L2 (on detached features), straight-through gradients. The MM-EMA update and the reset
  are *not* done in ``forward``: the trainer's per-batch hook (``CMGAuxiliary``, avmoe/tasks/cmg.py)
  calls ``ema_update`` / ``reset_idle`` once per training micro-batch with statistics summed
  over every rank, so evaluation and FLOP probes never move the codebook.
* ``CrossCPC`` (2-layer LSTM context, one t per batch, K=1, InfoNCE whose softmax runs over the
  batch's predictions, cross terms 1.0 + same-modality 0.1), ``CLUBSample`` (the code's
  ``CLUBSample_group``), ``cmcm_loss`` (the code's L_cmcm, weight 0.5 applied by the caller).
* ``VectorDecoder``: [Linear(D, D)(code) ; specific] -> Linear(D + S -> in), the code's audio
  decoder, for both modalities.

Differences from the code, all deliberate: float32 instead of float64; ``cmcm_loss`` guards the
square root of a distance that rounds below zero (the code would produce NaN); the reset runs
in training only (the code also counts eval-mode forwards); the LSTM zero state is built in the
model's dtype (the code's AV ``Cross_CPC`` builds it as float and fails with its double model).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class SemanticEncoder(nn.Module):
    """(B, T, in) -> (B, T, D): Linear, then ``layers`` post-norm Transformer encoder layers."""

    def __init__(self, in_dim: int, dim: int = 256, heads: int = 4, ffn: int = 1024, layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.affine = nn.Linear(in_dim, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout, activation="relu", batch_first=True)
        # the code clones one initialised layer: every layer starts from the same weights
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.affine(x)
        for layer in self.layers:
            x = layer(x)
        return x


class SpecificEncoder(nn.Module):
    def __init__(self, in_dim: int, dim: int = 256):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class VectorDecoder(nn.Module):
    """Rebuilds a modality's input feature from its code and its specific feature."""

    def __init__(self, code_dim: int, specific_dim: int, out_dim: int):
        super().__init__()
        self.code_fc = nn.Linear(code_dim, code_dim)
        self.out = nn.Linear(code_dim + specific_dim, out_dim)

    def forward(self, code: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.code_fc(code), specific], -1))


class CrossCodebook(nn.Module):
    """The shared codebook and its EMA / reset state (all buffers: saved with the model)."""

    def __init__(self, size: int = 400, dim: int = 256):
        super().__init__()
        emb = torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)
        self.register_buffer("embedding", emb)
        self.register_buffer("ema_count", torch.zeros(size))
        self.register_buffer("ema_weight", emb.clone())
        self.register_buffer("unused", torch.full((size,), -1, dtype=torch.long))  # the code's -1 start
        self.register_buffer("resets_total", torch.zeros((), dtype=torch.long))
        self.size, self.dim = size, dim

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) index of the nearest code (squared L2, as the code's addmm)."""
        flat = z.detach().reshape(-1, self.dim).to(self.embedding.dtype)
        d = torch.addmm((self.embedding ** 2).sum(1)[None, :] + (flat ** 2).sum(1, keepdim=True),
                        flat, self.embedding.t(), beta=1.0, alpha=-2.0)
        return d.argmin(-1).reshape(z.shape[:-1])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.embedding)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, code vectors (no gradient), straight-through output z + sg(e - z))."""
        idx = self.nearest(z)
        e = self.lookup(idx).to(z.dtype)
        return idx, e, z + (e - z).detach()

    # ------------------------------------------------------------------ training-time updates
    @torch.no_grad()
    def ema_update(self, stats: dict[str, torch.Tensor], decay: float, eps: float, mode: str) -> None:
        """Apply one batch's MM-EMA update from ``stats`` (summed over ranks by the caller):
        ``count_a``/``count_v`` (M,) hits of each modality, ``sum_a``/``sum_v`` (M, D) the mixed
        vectors assigned to each code by each modality (``mm_ema_stats``).

        ``mode="code"`` (the released code): two sequential EMA steps, audio then video, each
        with its own decay and Laplace smoothing of the counts. ``"paper"`` (Eq. 7): one step
        whose counts are both modalities' hits."""
        steps = ([("count_a", "sum_a"), ("count_v", "sum_v")] if mode == "code"
                 else [("count", "sum")])
        if mode != "code":
            stats = {"count": stats["count_a"] + stats["count_v"], "sum": stats["sum_a"] + stats["sum_v"]}
        for ck, sk in steps:
            count = self.ema_count * decay + (1 - decay) * stats[ck].to(self.ema_count.dtype)
            n = count.sum()
            self.ema_count.copy_((count + eps) / (n + self.size * eps) * n)
            self.ema_weight.mul_(decay).add_(stats[sk].to(self.ema_weight.dtype), alpha=1 - decay)
            self.embedding.copy_(self.ema_weight / self.ema_count[:, None])

    @torch.no_grad()
    def reset_idle(self, used: torch.Tensor, after: int, pool_within: int, noise: float,
                   generator: torch.Generator) -> int:
        """The code's reset: every counter +1, codes ``used`` (M,) bool in this batch (by either
        modality, on any rank) back to 0; a code idle for more than ``after`` batches becomes a
        random code used within the last ``pool_within`` batches plus U(-noise, noise). Only
        ``embedding`` changes (the EMA statistics stay, as in the code). Returns the resets."""
        self.unused.add_(1)
        self.unused[used] = 0
        dead = self.unused > after
        pool = ((self.unused >= 0) & (self.unused < pool_within)).nonzero().flatten()
        n_dead = int(dead.sum())
        if not n_dead or not len(pool):
            return 0
        self.unused[dead] = 0
        source = pool[torch.randint(len(pool), (n_dead,), generator=generator)]
        jitter = torch.rand((n_dead, self.dim), generator=generator) * (2 * noise) - noise
        self.embedding[dead] = self.embedding[source] + jitter.to(self.embedding)
        self.resets_total.add_(n_dead)
        return n_dead


def mm_ema_stats(codebook: CrossCodebook, z_a: torch.Tensor, z_v: torch.Tensor, idx_a: torch.Tensor,
                 idx_v: torch.Tensor, mode: str, own_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """One batch's MM-EMA statistics (to be summed over ranks): per code, the hits of each
    modality and the sum of the vectors that update it. ``"code"``: for an audio hit at (b, t),
    ``own_weight`` x z_a(b, t) + (1 - own_weight) x z_v(b, t), the time-aligned video vector
    (and the mirror for video hits). ``"paper"``: (z_a + r_v) / 2 with r_v the other modality's
    cross-attention summary over the clip's seconds (softmax(z_a z_v^T / sqrt(D)) z_v)."""
    za, zv = z_a.detach().float(), z_v.detach().float()
    if mode == "paper":
        scale = 1.0 / math.sqrt(za.shape[-1])
        r_v = torch.softmax(za @ zv.transpose(1, 2) * scale, -1) @ zv
        r_a = torch.softmax(zv @ za.transpose(1, 2) * scale, -1) @ za
        mix_a, mix_v = 0.5 * (za + r_v), 0.5 * (zv + r_a)
    else:
        mix_a = own_weight * za + (1 - own_weight) * zv
        mix_v = own_weight * zv + (1 - own_weight) * za
    m, d = codebook.size, codebook.dim
    out = {}
    for key, idx, mix in (("a", idx_a, mix_a), ("v", idx_v, mix_v)):
        flat_idx = idx.reshape(-1)
        out[f"count_{key}"] = torch.bincount(flat_idx, minlength=m).float()
        out[f"sum_{key}"] = torch.zeros(m, d, device=mix.device).index_add_(0, flat_idx, mix.reshape(-1, d))
    return out


def perplexity(idx: torch.Tensor, size: int) -> float:
    """exp(entropy) of the code usage of ``idx`` (the code's per-batch perplexity)."""
    p = torch.bincount(idx.reshape(-1), minlength=size).double() / max(1, idx.numel())
    return float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))


def cmcm_loss(z_a: torch.Tensor, z_v: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """L_cmcm of the code (Liu et al. 2021 as CMG computes it), unweighted: soft code
    histograms softmax(-||z - e||) averaged over time; S[i, j] = sum_m P_a[i,m] log P_v[j,m] +
    P_v[i,m] log P_a[j,m]; row-wise InfoNCE with the diagonal as positives."""
    b, t, d = z_a.shape
    codes = codes.detach().clone()  # (the codebook changes in place before backward runs)

    def hist(z):
        sq = (z.reshape(-1, d) ** 2).sum(1, keepdim=True) + (codes ** 2).sum(1)[None] - 2 * z.reshape(-1, d) @ codes.t()
        p = torch.softmax(-sq.clamp_min(1e-12).sqrt(), -1)
        return p.reshape(b, t, -1).mean(1)

    pa, pv = hist(z_a), hist(z_v)
    s = pa @ torch.log(pv + 1e-10).t() + pv @ torch.log(pa + 1e-10).t()
    e = torch.exp(s - s.min().detach())  # the code's shift max(-S): every exponent >= 0
    return -torch.log(e.diagonal() / (e.sum(1) + 1e-5)).mean()


class CrossCPC(nn.Module):
    """Cross-modal contrastive predictive coding (code: ``Cross_CPC``)."""

    def __init__(self, dim: int = 256, context: int = 256, layers: int = 2, steps: int = 1,
                 min_start: int = 1, self_weight: float = 0.1):
        super().__init__()
        self.lstm_v = nn.LSTM(dim, context, num_layers=layers, batch_first=True)
        self.lstm_a = nn.LSTM(dim, context, num_layers=layers, batch_first=True)
        self.pred_v = nn.ModuleList([nn.Linear(context, dim) for _ in range(steps)])
        self.pred_a = nn.ModuleList([nn.Linear(context, dim) for _ in range(steps)])
        self.steps, self.min_start, self.self_weight = steps, min_start, self_weight

    def forward(self, z_v: torch.Tensor, z_a: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        b, t, _ = z_v.shape
        span = t - self.steps - self.min_start
        if span < 1:
            raise ValueError(f"Cross-CPC needs more than {self.steps + self.min_start} segments, got {t}")
        # one context end per batch, drawn from 1..T-K-1 as randint(T-K-min_start)+min_start
        s = int(torch.randint(span, (1,))) + self.min_start
        ctx_v = self.lstm_v(z_v[:, :s + 1])[0][:, s]
        ctx_a = self.lstm_a(z_a[:, :s + 1])[0][:, s]
        nce = z_v.new_zeros(())
        accs: dict[str, float] = {}
        for k in range(self.steps):
            tv, ta = z_v[:, s + k + 1], z_a[:, s + k + 1]
            pv, pa = self.pred_v[k](ctx_v), self.pred_a[k](ctx_a)
            terms = {"a2v": (tv @ pa.t(), 1.0), "v2a": (ta @ pv.t(), 1.0),
                     "v2v": (tv @ pv.t(), self.self_weight), "a2a": (ta @ pa.t(), self.self_weight)}
            for name, (score, w) in terms.items():
                nce = nce + w * torch.log_softmax(score, 1).diagonal().sum()
                accs[name] = float((torch.softmax(score, 1).argmax(0) == torch.arange(b, device=score.device))
                                   .float().mean())
        return nce / (-b * self.steps), accs


class CLUBSample(nn.Module):
    """The sampled CLUB upper bound of I(x; y) (code: ``CLUBSample_group``): q(y|x) Gaussian with
    MLP mean and tanh log-variance; ``loglikeli`` trains q (its own optimiser), ``mi_est`` is the
    bound the encoders minimise (one shuffled negative per sample, squared errors averaged over
    time)."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256):
        super().__init__()
        h = hidden // 2

        def mlp(last):
            return nn.Sequential(nn.Linear(x_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h),
                                 nn.ReLU(), nn.Linear(h, y_dim), *last)

        self.p_mu = mlp([])
        self.p_logvar = mlp([nn.Tanh()])

    def loglikeli(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.p_mu(x), self.p_logvar(x)
        mu, logvar, y = (v.reshape(-1, v.shape[-1]) for v in (mu, logvar, y))
        return (-(mu - y) ** 2 / logvar.exp() - logvar).sum(1).mean(0) / 2

    def mi_est(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.p_mu(x), self.p_logvar(x)
        var = logvar.mean(1).exp()
        pos = -((mu - y) ** 2).mean(1) / var
        neg = -((mu - y[perm]) ** 2).mean(1) / var
        return (pos.sum(-1) - neg.sum(-1)).mean() / 2
