"""AVVP (LLP): weakly supervised audio-visual video parsing, 25 classes, MGN head (spec §3.2).

Loss = BCE(p_av, y) + BCE(p_a, a y + (1-a)/2) + BCE(p_v, v y + (1-v)/2) with a = 1, v = 0.9
(label smoothing on the visual target only) + CE(fc_cls(c_a), [0..24]) + CE(fc_cls(c_v), [0..24])
+ lb_weight (1.0) * load balance; probabilities clamped to [1e-7, 1 - 1e-7] (out of place: the
code's ``clamp_`` is in place, same values and gradients). Works at any batch size.
Metric: segment/event-level F1 of the official evaluation; primary "seg_type" (Type@AV).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avmoe.config import OptimConfig, tiny_adapter, tiny_audio, tiny_visual
from avmoe.models.heads.avvp import AVVPConfig, AVVPHead
from avmoe.tasks.base import MetricAccumulator, Task, register_task


class AVVPAccumulator(MetricAccumulator):
    def reset(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("pa", "pv", "ga", "gv")}

    def update(self, preds: dict[str, Any], batch) -> None:
        from avmoe.metrics import avvp_binarize

        video = np.asarray(preds["video_prob"])
        # frame probs are (N, T, C); the official eval and the GT are (N, C, T)
        for key, frame in (("pa", preds["audio_frame_prob"]), ("pv", preds["visual_frame_prob"])):
            self.parts[key].append(avvp_binarize(np.asarray(frame), video, layout="NTC").transpose(0, 2, 1))
        self.parts["ga"].append(batch.targets["gt_audio"].cpu().numpy())
        self.parts["gv"].append(batch.targets["gt_visual"].cpu().numpy())

    def compute(self) -> dict[str, float]:
        from avmoe.metrics import avvp_scores

        if not self.parts["pa"]:
            return {}
        pa, pv, ga, gv = (np.concatenate(self.parts[k]) for k in ("pa", "pv", "ga", "gv"))
        return avvp_scores(pa, pv, ga, gv, layout="NCT")


@register_task("avvp")
class AVVPTask(Task):
    head = AVVPHead
    primary_metric = "seg_type"
    supports_ogm = True
    demo_schedule = dict(epochs=2, batch_size=4, grad_accum=1, lr=1e-3, scheduler="none")

    config_class = AVVPConfig
    presets = {
        # released train.sh: 1/1 experts, all 12 paired blocks, K 32, r 8, G 2, no BN, gates on
        "base": {"adapter": dict(num_cma=1, num_ua=1, num_skip=1, num_tokens=32, reduction=8, groups=2,
                                 use_bn=False, audio_gate=True, ua_variant="v2", lb_weight=1.0)},
        "official": {"adapter.ua_variant": "paramfree", "backbone_train_mode": True, "audio.spec_augment": True,
                     "audio.mixup": True, "visual.antialias": False},
        "tiny": {"visual": tiny_visual(), "audio": tiny_audio(), "adapter": tiny_adapter(num_skip=1), "dim": 16,
                 "st_dim": 8, "depth_vis": 1, "depth_aud": 1, "depth_av": 1, "num_heads": 2},
    }
    training = OptimConfig(optimizer="adam", lr=3e-4, weight_decay=0.0, scheduler="step", step_size=10, gamma=0.1,
                           epochs=40, batch_size=1, grad_accum=8, seed=23)

    def model_keys(self, manifest):
        keys = super().model_keys(manifest)
        classes = (manifest.get("label_vocab") or {}).get("classes")
        if classes is not None:
            keys["num_classes"] = len(classes)
        # the shards' r2p1d.npy are (T, 512) R(2+1)D-18 features (data_pipeline/SCHEMA.md); the
        # tiny preset's own st_dim is for hand-made test batches
        keys["st_dim"] = int(manifest.get("feature_dim", 512))
        return keys

    def example_targets(self, cfg, batch_size, generator):
        b, t, c = batch_size, cfg.num_segments, cfg.num_classes
        return {"video_labels": (torch.rand(b, c, generator=generator) > 0.85).float(),
                "features": torch.randn(b, t, cfg.st_dim, generator=generator),
                "gt_audio": (torch.rand(b, c, t, generator=generator) > 0.9).to(torch.uint8),
                "gt_visual": (torch.rand(b, c, t, generator=generator) > 0.9).to(torch.uint8)}

    def loss(self, out, batch, cfg):
        y = batch.targets["video_labels"].to(out["video_prob"].device, torch.float32)
        eps = cfg.clamp_eps

        def bce(p, target):
            return F.binary_cross_entropy(p.clamp(eps, 1 - eps), target)

        a, v = cfg.audio_target_scale, cfg.visual_target_scale
        cls_target = torch.arange(cfg.num_classes, device=y.device)
        parts = {
            "av": bce(out["video_prob"], y),
            "a": bce(out["audio_prob"], a * y + (1 - a) * 0.5),
            "v": bce(out["visual_prob"], v * y + (1 - v) * 0.5),
            "cls_a": F.cross_entropy(out["audio_cls_logits"], cls_target),
            "cls_v": F.cross_entropy(out["visual_cls_logits"], cls_target),
        }
        total = sum(parts.values())
        total = self.add_load_balance(total, parts, out, cfg)
        return total, self._floats(parts)

    def predict(self, out, batch):
        keys = ("video_prob", "audio_prob", "visual_prob", "audio_frame_prob", "visual_frame_prob")
        return {k: out[k].detach().cpu() for k in keys}

    def metric_accumulator(self, cfg):
        return AVVPAccumulator()

    @torch.no_grad()
    def ogm_scores(self, model, out, batch):
        """The head's own per-modality video-level probabilities; the score of a video is the
        mean probability of its true labels (the multi-label analogue of p[y])."""
        y = batch.targets["video_labels"].to(out["audio_prob"].device).float()
        n = y.sum(1).clamp(min=1)
        return ((out["audio_prob"] * y).sum(1) / n).sum(), ((out["visual_prob"] * y).sum(1) / n).sum()

    def prediction_record(self, preds, cfg, vocab):
        """The audio and the visual event tracks: per second the classes the official rule
        predicts (frame probability >= 0.5 and video probability >= 0.5), with the frame
        probability; and the video-level probabilities above 0.5."""
        from avmoe.metrics import avvp_binarize

        classes = list(vocab.get("classes") or [])
        out = {"video_labels": {classes[c]: float(p) for c, p in enumerate(preds["video_prob"][0].tolist()) if p >= 0.5}}
        for m in ("audio", "visual"):
            frame = preds[f"{m}_frame_prob"][0].float()  # (T, C)
            on = avvp_binarize(frame, preds[f"{m}_prob"][0].float(), layout="NTC")
            out[f"{m}_events"] = [[{"label": classes[c], "probability": float(frame[t, c])}
                                   for c in np.nonzero(on[t])[0]] for t in range(frame.shape[0])]
        return out

    def plot_prediction(self, record, frames, out_dir, title):
        from avmoe.plots import plot_clip_tracks

        tracks = {m: [[(e["label"], e["probability"]) for e in sec] for sec in record[f"{m}_events"]]
                  for m in ("audio", "visual")}
        return [plot_clip_tracks(frames, tracks, out_dir, title)]

    def plot_predictions(self, items, out_dir, title):
        from avmoe.plots import plot_event_maps
        from data_pipeline.datasets.avvp import CATEGORIES

        return [plot_event_maps(items, out_dir, title, CATEGORIES)]
