"""AVE: supervised audio-visual event localisation (28 classes + background, spec §3.1).

Loss = BCEWithLogits(is_event, segment is foreground) + CE(event, video class)
+ CE(av_score, video class), video class = max over time of the per-segment class (one event
class per AVE video; background segments count as class 0 there, as the code's argmax of an
all-zero foreground row). Prediction: sigma(is_event) > 0.5 (strict) -> the video's argmax class,
else background 28. Metric: segment accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avmoe.config import (
    AVEConfig, apply_overrides, paper_audio, paper_visual,
    tiny_adapter, tiny_audio, tiny_temporal, tiny_visual,
)
from avmoe.tasks.base import MetricAccumulator, Task

BACKGROUND = 28


def segment_labels(batch) -> torch.Tensor:
    y = batch.targets["segment_labels"]
    return (y.argmax(-1) if y.dim() == 3 else y).long()


class AVEAccumulator(MetricAccumulator):
    def reset(self) -> None:
        self.pred: list[np.ndarray] = []
        self.gt: list[np.ndarray] = []

    def update(self, preds: dict[str, Any], batch) -> None:
        self.pred.append(np.asarray(preds["labels"]))
        self.gt.append(segment_labels(batch).cpu().numpy())

    def compute(self) -> dict[str, float]:
        from avmoe.metrics import ave_accuracy

        if not self.pred:
            return {"acc": float("nan")}
        return {"acc": ave_accuracy(np.concatenate(self.pred), np.concatenate(self.gt))}


class AVETask(Task):
    name = "ave"
    config_cls = AVEConfig
    primary_metric = "acc"

    def make_preset(self, preset: str) -> AVEConfig:
        cfg = AVEConfig(visual=paper_visual(), audio=paper_audio())
        # released train.sh: 1 CMA + 1 UA, stages 0 and 2, K 32, r 8, G 2, BN, gated audio
        apply_overrides(cfg, {"adapter": dict(num_cma=1, num_ua=1, num_skip=2, num_tokens=32, reduction=8,
                                              groups=2, use_bn=True, audio_gate=True, ua_variant="v2")})
        apply_overrides(cfg, {"optim": dict(lr=5e-4, scheduler="step", step_size=3, gamma=0.35, epochs=50,
                                            batch_size=2, grad_accum=8, early_stop=20, seed=999,
                                            select_split="val")})
        if preset == "official":
            apply_overrides(cfg, {"adapter.ua_variant": "none", "backbone_train_mode": True,
                                  "audio.spec_augment": True, "optim.select_split": "test"})
        elif preset == "tiny":
            cfg.visual, cfg.audio, cfg.temporal = tiny_visual(), tiny_audio(), tiny_temporal()
            apply_overrides(cfg, {"adapter": tiny_adapter(num_skip=2), "visual_dim": 32})
        return cfg

    def loss(self, out, batch, cfg):
        labels = segment_labels(batch).to(out["is_event"].device)
        fg = labels != BACKGROUND
        video_class = torch.where(fg, labels, torch.zeros_like(labels)).max(1).values
        parts = {
            "event": F.binary_cross_entropy_with_logits(out["is_event"], fg.float()),
            "cls": F.cross_entropy(out["event_logits"], video_class),
            "av": F.cross_entropy(out["av_score"], video_class),
        }
        total = parts["event"] + parts["cls"] + parts["av"]
        total = self.add_load_balance(total, parts, out, cfg)
        return total, self._floats(parts)

    def predict(self, out, batch):
        is_event = out["is_event"].detach()
        cls = out["event_logits"].detach().argmax(-1, keepdim=True)
        labels = torch.where(is_event > 0, cls, torch.full_like(cls, BACKGROUND))  # sigma > 0.5 <=> logit > 0
        return {"labels": labels.cpu(), "is_event": is_event.cpu(), "event_logits": out["event_logits"].detach().cpu()}

    def metric_accumulator(self, cfg):
        return AVEAccumulator()
