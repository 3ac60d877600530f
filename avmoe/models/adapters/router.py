"""Per-frame soft router of an MoE adapter and its load-balancing loss (spec §2.3).

Input u = [mean_tokens(X) ; mean_tokens(Ŷ)]; MLP 2D -> 128 -> 32 -> E with ReLUs (PyTorch
default init); w = softmax(logits) (+ N(0, sigma^2) logit noise in training, AVS only). Every
expert is computed and mixed densely with w: there is no top-k; argmax(w) is telemetry only.

Telemetry: each router accumulates, since the last reset, the sum of its routing weights and
the argmax counts per expert (non-persistent buffers, so checkpoints are unaffected).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


LB_FORMS = ("official", "kl", "kl_over_e")


def load_balance_loss(probs: torch.Tensor, form: str = "official") -> torch.Tensor:
    """The load-balancing term of one router, p̄ = ``probs`` (N, E) averaged over the N frames.

    * ``"official"``: −Σ_e log p̄_e, the value of the released code. Its router input keeps a
      token axis (``mean(dim=1, keepdim=True)``), so its probabilities are (N, 1, E), p̄ is
      (1, E), the "uniform" target ``1 / p̄.size(0)`` is 1.0 and ``reduction="batchmean"``
      divides by 1: ``F.kl_div(p̄.log(), 1, "batchmean") = Σ_e (0 − log p̄_e)``
      = E·(KL(U ‖ p̄) + log E); its gradient is E times that of ``"kl"``.
    * ``"kl"``: KL(U ‖ p̄) = Σ_e (1/E)(log(1/E) − log p̄_e), the equation as written (0 when
      balanced).
    * ``"kl_over_e"``: KL(U ‖ p̄) / E, what ``batchmean`` would give on a 1-D (E,) tensor (our
      former default, a misreading of the code: its gradient is 1/E² of the official one).
    """
    p_mean = probs.mean(0)
    e = p_mean.numel()
    if form == "official":
        return -p_mean.log().sum()
    kl = ((math.log(1.0 / e) - p_mean.log()) / e).sum()
    if form == "kl":
        return kl
    if form == "kl_over_e":
        return kl / e
    raise ValueError(f"load-balance form must be one of {', '.join(LB_FORMS)}; got {form!r}")


class Router(nn.Module):
    def __init__(self, in_dim: int, num_experts: int, hidden: tuple[int, ...] = (128, 32),
                 noise_std: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_experts))
        self.mlp = nn.Sequential(*layers)
        self.noise_std = noise_std
        self.num_experts = num_experts
        self.register_buffer("stat_weight_sum", torch.zeros(num_experts), persistent=False)
        self.register_buffer("stat_argmax_count", torch.zeros(num_experts, dtype=torch.long),
                             persistent=False)
        self.register_buffer("stat_samples", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x_mean: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
        """(N, D_x), (N, D_x) -> routing weights (N, E), rows summing to 1."""
        logits = self.mlp(torch.cat([x_mean, y_mean], dim=-1))
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(logits, dim=-1)
        with torch.no_grad():
            p = probs.detach()
            self.stat_weight_sum += p.sum(0).to(self.stat_weight_sum.dtype)
            # one_hot + sum rather than bincount: deterministic on CUDA
            self.stat_argmax_count += F.one_hot(p.argmax(-1), self.num_experts).sum(0)
            self.stat_samples += p.shape[0]
        return probs

    def stats(self) -> dict[str, torch.Tensor]:
        n = self.stat_samples.clamp(min=1).to(self.stat_weight_sum.dtype)
        return {"mean_weight": (self.stat_weight_sum / n).detach().cpu(),
                "argmax_count": self.stat_argmax_count.detach().cpu().clone()}

    def reset_stats(self) -> None:
        self.stat_weight_sum.zero_()
        self.stat_argmax_count.zero_()
        self.stat_samples.zero_()
