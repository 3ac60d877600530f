"""OGM-GE (Peng et al., CVPR 2022; ../shared/spec/related-methods.md §1) for the trunk's adapters.

Per optimiser step:

1. uni-modal scores s^a, s^v = the summed true-class probabilities of per-modality predictions,
   accumulated over the micro-batches of the step and **all-reduced** (the global batch, as the
   released code's DataParallel batch);
2. rho^v = s^v / s^a, rho^a = 1 / rho^v; the dominant modality u (rho^u > 1) gets
   k^u = 1 - tanh(alpha * rho^u), the other k = 1;
3. after the gradient all-reduce, every trainable adapter parameter of modality u
   (``trunk.adapters.*_{audio,visual}.*``: the AVMoE experts and routers that sit in that
   modality's encoder -- the frozen backbones have no gradient) gets ``grad <- k^u * grad``;
   with GE also ``+ N(0, std(unscaled grad)^2)`` on both modalities' adapters, the noise drawn
   from a generator seeded with (seed, step) so every rank adds the same noise and the replicas
   stay identical.

Applied only for ``ogm_start_epoch <= epoch <= ogm_end_epoch`` (inclusive, as the code).

Per-modality predictions (no extra heads, as OGM-GE's estimates from the shared classifier)
are the task's: ``Task.ogm_scores(model, out, batch)`` returns the micro-batch's summed
true-class probabilities of its audio-only and visual-only estimates (see each task's file).

Limitation: needs ZeRO stage 0. From stage 1 on, DeepSpeed reduces gradients into partitioned
flat buffers and frees ``param.grad``, so there is no per-parameter gradient to modulate
between the all-reduce and the optimiser step; the config refuses that combination.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

MODALITIES = ("audio", "visual")


def adapter_params(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    out: dict[str, list[torch.nn.Parameter]] = {m: [] for m in MODALITIES}
    for name, p in model.named_parameters():
        if not p.requires_grad or ".adapters." not in f".{name}":
            continue
        key = name.split(".adapters.", 1)[1].split(".", 1)[0]  # b0_mha_visual
        for m in MODALITIES:
            if key.endswith("_" + m):
                out[m].append(p)
    return out


def coefficients(s_audio: float, s_visual: float, alpha: float) -> tuple[float, float, float]:
    """(k_audio, k_visual, rho_visual) from the global summed scores (spec step 3-4)."""
    rho_v = s_visual / max(s_audio, 1e-12)
    rho_a = 1.0 / max(rho_v, 1e-12)
    k_a = k_v = 1.0
    if rho_v > 1:
        k_v = 1 - math.tanh(alpha * rho_v)
    elif rho_a > 1:
        k_a = 1 - math.tanh(alpha * rho_a)
    return k_a, k_v, rho_v


class OGMGE:
    def __init__(self, task, model: torch.nn.Module, alpha: float, noise: bool, seed: int,
                 start_epoch: int, end_epoch: int) -> None:
        if not task.supports_ogm:
            raise ValueError(f"task {task.name!r} does not support OGM-GE")
        self.task, self.model = task, model
        self.alpha, self.noise, self.seed = alpha, noise, seed
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.params = adapter_params(model)
        self.device = next(model.parameters()).device  # NCCL all-reduces device tensors only
        self.reset()
        self.last: dict[str, float] = {}

    def reset(self) -> None:
        self.s = torch.zeros(2, dtype=torch.float64)  # (audio, visual) summed over the step

    @torch.no_grad()
    def observe(self, out: dict[str, Any], batch) -> None:
        """Add this micro-batch's per-modality true-class probabilities."""
        sa, sv = self.task.ogm_scores(self.model, out, batch)
        self.s += torch.stack([sa.double().cpu(), sv.double().cpu()])

    def active(self, epoch: int) -> bool:
        return self.start_epoch <= epoch <= self.end_epoch

    @torch.no_grad()
    def modulate(self, epoch: int, step: int) -> dict[str, float]:
        """Call between the gradient all-reduce (backward at the accumulation boundary) and the
        optimiser step. Returns the logged ratio / coefficients."""
        s = self.s.to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(s)
        s = s.cpu()
        self.reset()
        k_a, k_v, rho_v = coefficients(float(s[0]), float(s[1]), self.alpha)
        self.last = {"ogm_ratio_v": rho_v, "ogm_k_audio": k_a, "ogm_k_visual": k_v}
        if not self.active(epoch):
            return self.last
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # identical on every rank
        for mod, k in (("audio", k_a), ("visual", k_v)):
            for p in self.params[mod]:
                if p.grad is None:
                    continue
                std = float(p.grad.std()) + 1e-8 if self.noise and p.grad.numel() > 1 else 0.0
                if k != 1.0:
                    p.grad.mul_(k)
                if self.noise:
                    noise = torch.randn(p.grad.shape, generator=g, dtype=torch.float32) * std
                    p.grad.add_(noise.to(p.grad.device, p.grad.dtype))
        return self.last
