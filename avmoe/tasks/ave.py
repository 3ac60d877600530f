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

from avmoe.config import OptimConfig, tiny_adapter, tiny_audio, tiny_temporal, tiny_visual
from avmoe.models.heads.ave import AVEConfig, AVEHead, topk_time_mean
from avmoe.tasks.base import MetricAccumulator, Task, register_task
from data_pipeline.datasets.ave import BACKGROUND, CATEGORIES


def segment_labels(batch) -> torch.Tensor:
    y = batch.targets["segment_labels"]
    return (y.argmax(-1) if y.dim() == 3 else y).long()


def video_class(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) segment labels -> (B,) the video's event class (background counts as 0)."""
    fg = labels != BACKGROUND
    return torch.where(fg, labels, torch.zeros_like(labels)).max(1).values


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


@register_task("ave")
class AVETask(Task):
    head = AVEHead
    primary_metric = "acc"
    supports_ogm = True
    # the synthetic set is small (48 training videos): more, smaller steps than the paper's
    # batch 2 x accumulation 8, and no StepLR decay (its step size is in epochs of 4143 videos)
    demo_schedule = dict(epochs=6, batch_size=4, grad_accum=1, lr=1e-3, scheduler="none")

    config_class = AVEConfig
    presets = {
        # released train.sh: 1 CMA + 1 UA, stages 0 and 2, K 32, r 8, G 2, BN, gated audio
        "base": {"adapter": dict(num_cma=1, num_ua=1, num_skip=2, num_tokens=32, reduction=8, groups=2,
                                 use_bn=True, audio_gate=True, ua_variant="v2")},
        # (frames: torchvision 0.14's tensor Resize, no antialiasing)
        "official": {"adapter.ua_variant": "none", "backbone_train_mode": True, "audio.spec_augment": True,
                     "visual.antialias": False},
        "tiny": {"visual": tiny_visual(), "audio": tiny_audio(), "temporal": tiny_temporal(),
                 "adapter": tiny_adapter(num_skip=2), "visual_dim": 32},
    }
    training = OptimConfig(optimizer="adam", lr=5e-4, weight_decay=0.0, scheduler="step", step_size=3, gamma=0.35,
                           epochs=50, batch_size=2, grad_accum=8, early_stop=20, seed=999)

    def model_keys(self, manifest):
        keys = super().model_keys(manifest)
        classes = (manifest.get("label_vocab") or {}).get("classes")
        if classes is not None:
            keys["num_classes"] = len(classes)
        return keys

    def example_targets(self, cfg, batch_size, generator):
        b, t = batch_size, cfg.num_segments
        labels = torch.randint(0, cfg.num_classes, (b, 1), generator=generator).expand(b, t).clone()
        labels[:, 0] = BACKGROUND  # one background segment per video
        return {"segment_labels": labels}

    def loss(self, out, batch, cfg):
        labels = segment_labels(batch).to(out["is_event"].device)
        cls = video_class(labels)
        parts = {
            "event": F.binary_cross_entropy_with_logits(out["is_event"], (labels != BACKGROUND).float()),
            "cls": F.cross_entropy(out["event_logits"], cls),
            "av": F.cross_entropy(out["av_score"], cls),
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

    @torch.no_grad()
    def ogm_scores(self, model, out, batch):
        """The CMBS per-modality class scores (top-k time mean of ``video_cas`` /
        ``audio_cas``), softmax, probability of the video class."""
        k = model.head.topk
        y = video_class(segment_labels(batch)).to(out["audio_cas"].device)
        pa = F.softmax(topk_time_mean(out["audio_cas"], k), -1)
        pv = F.softmax(topk_time_mean(out["video_cas"], k), -1)
        return pa.gather(1, y[:, None]).sum(), pv.gather(1, y[:, None]).sum()

    def prediction_record(self, preds, cfg, vocab):
        """Per second: the event class or background, with its confidence (P(event) x P(class)
        for an event, 1 - P(event) for background)."""
        classes = list(vocab.get("classes") or CATEGORIES)
        p_event = torch.sigmoid(preds["is_event"][0].float().reshape(-1))
        p_class = torch.softmax(preds["event_logits"][0].float().reshape(-1), -1)
        labels = preds["labels"][0].reshape(-1).tolist()
        seconds = []
        for t, c in enumerate(labels):
            fg = c != BACKGROUND
            seconds.append({"second": t, "label": classes[c] if fg else "background",
                            "confidence": float(p_event[t] * p_class[c]) if fg else float(1 - p_event[t])})
        top = int(p_class.argmax())
        return {"video_class": classes[top], "video_class_probability": float(p_class[top]), "seconds": seconds}

    def plot_prediction(self, record, frames, out_dir, title):
        from avmoe.plots import plot_clip_tracks

        track = [[(s["label"], s["confidence"])] if s["label"] != "background" else [] for s in record["seconds"]]
        return [plot_clip_tracks(frames, {"event": track}, out_dir, title)]

    def plot_predictions(self, items, out_dir, title):
        from avmoe.plots import plot_segment_timelines

        return [plot_segment_timelines(items, out_dir, title, CATEGORIES, BACKGROUND)]
