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

Per-modality predictions (no extra heads, as OGM-GE's estimates from the shared classifier):

* ave: the CMBS per-modality class scores (top-k time mean of ``video_cas`` / ``audio_cas``,
  captured with forward hooks), softmax, probability of the video class;
* avvp: the head's own per-modality video-level probabilities ``audio_prob`` / ``visual_prob``;
  the score is the mean probability of the true labels (multi-label analogue of p[y]);
* avqa: the concat-fusion split of OGM-GE: ``fc_fusion`` acts on [audio ; visual]; the audio
  estimate uses the first half of its weight (+ b/2) with the visual half zeroed, and vice
  versa, then the answer classifier; softmax, probability of the true answer.

Limitation: needs ZeRO stage 0. From stage 1 on, DeepSpeed reduces gradients into partitioned
flat buffers and frees ``param.grad``, so there is no per-parameter gradient to modulate
between the all-reduce and the optimiser step; the config refuses that combination.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    def __init__(self, task: str, model: torch.nn.Module, alpha: float, noise: bool, seed: int,
                 start_epoch: int, end_epoch: int) -> None:
        if task not in ("ave", "avvp", "avqa"):
            raise ValueError(f"OGM-GE supports ave, avvp, avqa; not {task!r}")
        self.task, self.alpha, self.noise, self.seed = task, alpha, noise, seed
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.params = adapter_params(model)
        self.device = next(model.parameters()).device  # NCCL all-reduces device tensors only
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = []
        head = model.head
        if task == "ave":
            for nm in ("audio_cas", "video_cas"):
                self._hooks.append(getattr(head, nm).register_forward_hook(self._capture(nm)))
            self.topk = head.topk
        elif task == "avqa":
            self._hooks.append(head.fc_fusion.register_forward_hook(self._capture("fusion_in", inputs=True)))
            self._hooks.append(head.question.register_forward_hook(self._capture("q")))
            self.head = head
        self.reset()
        self.last: dict[str, float] = {}

    def _capture(self, name: str, inputs: bool = False):
        def hook(_mod, args, out):
            self._captured[name] = (args[0] if inputs else out).detach()
        return hook

    def reset(self) -> None:
        self.s = torch.zeros(2, dtype=torch.float64)  # (audio, visual) summed over the step

    @torch.no_grad()
    def observe(self, out: dict[str, Any], batch) -> None:
        """Add this micro-batch's per-modality true-class probabilities."""
        if self.task == "ave":
            from avmoe.models.heads.ave import topk_time_mean
            from avmoe.tasks.ave import BACKGROUND, segment_labels

            labels = segment_labels(batch)
            fg = labels != BACKGROUND
            y = torch.where(fg, labels, torch.zeros_like(labels)).max(1).values  # the task's video class
            pa = F.softmax(topk_time_mean(self._captured["audio_cas"], self.topk), -1)
            pv = F.softmax(topk_time_mean(self._captured["video_cas"], self.topk), -1)
            y = y.to(pa.device)
            sa, sv = pa.gather(1, y[:, None]).sum(), pv.gather(1, y[:, None]).sum()
        elif self.task == "avvp":
            y = batch.targets["video_labels"].to(out["audio_prob"].device).float()
            n = y.sum(1).clamp(min=1)
            sa = ((out["audio_prob"] * y).sum(1) / n).sum()
            sv = ((out["visual_prob"] * y).sum(1) / n).sum()
        else:
            f = self._captured["fusion_in"]  # (B, 2D) = tanh([audio ; visual])
            d = f.shape[-1] // 2
            w, b = self.head.fc_fusion.weight, self.head.fc_fusion.bias
            q = self._captured["q"]  # the question vector multiplying the fused feature
            y = batch.targets["answer"].to(f.device).long().view(-1)
            scores = []
            for half in (slice(0, d), slice(d, 2 * d)):
                z = f[:, half] @ w[:, half].T + b / 2
                logits = self.head.fc_ans(torch.tanh(z * q))
                scores.append(F.softmax(logits, -1).gather(1, y[:, None]).sum())
            sa, sv = scores
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

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
