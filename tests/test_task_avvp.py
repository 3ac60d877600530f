"""AVVP task: MGN head at batch size > 1, weakly supervised loss, metric, overfitting."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import build_tiny, make_batch, overfit_losses, single_thread  # noqa: E402

from avmoe.batch import AVBatch  # noqa: E402
from avmoe.tasks import get_task  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_shapes_at_batch_size_three():
    t, cfg, model = build_tiny("avvp")
    batch = make_batch("avvp", cfg, batch_size=3)
    model.train()
    out = model(batch)
    b, tt, c = 3, cfg.num_segments, cfg.num_classes
    assert out["video_prob"].shape == (b, c) and out["audio_prob"].shape == (b, c)
    assert out["audio_frame_prob"].shape == (b, tt, c) and out["visual_frame_prob"].shape == (b, tt, c)
    assert out["audio_cls_logits"].shape == (c, c)
    loss, parts = t.loss(out, batch, cfg)
    assert set(parts) == {"av", "a", "v", "cls_a", "cls_v", "lb"}
    expected = sum(parts[k] for k in ("av", "a", "v", "cls_a", "cls_v")) + cfg.adapter.lb_weight * parts["lb"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert cfg.adapter.lb_weight == 1.0


def test_videos_are_independent():
    """Frame features of one video must not leak into another (the code's (1, B*T, D) reshape did)."""
    t, cfg, model = build_tiny("avvp")
    model.eval()
    batch = make_batch("avvp", cfg, batch_size=2)
    with torch.no_grad():
        both = model(batch)["video_prob"]
        single = model(AVBatch(batch.frames[:1], batch.audio[:1],
                               {k: v[:1] for k, v in batch.targets.items()}))["video_prob"]
    torch.testing.assert_close(both[:1], single, atol=1e-5, rtol=1e-4)


def test_label_smoothing_targets():
    t = get_task("avvp")
    cfg = t.config(preset="tiny")
    c = cfg.num_classes
    y = torch.zeros(1, c)
    y[0, 3] = 1
    p = torch.full((1, c), 0.3)
    out = {"video_prob": p, "audio_prob": p, "visual_prob": p,
           "audio_cls_logits": torch.zeros(c, c), "visual_cls_logits": torch.zeros(c, c), "lb_loss": torch.tensor(0.0)}
    _, parts = t.loss(out, AVBatch(None, None, {"video_labels": y}), cfg)
    bce = torch.nn.functional.binary_cross_entropy
    assert parts["a"] == pytest.approx(float(bce(p, y)))
    assert parts["v"] == pytest.approx(float(bce(p, 0.9 * y + 0.05)))
    assert parts["cls_a"] == pytest.approx(np.log(c), rel=1e-6)


def test_metric_accumulator_uses_official_binarisation():
    t = get_task("avvp")
    cfg = t.config(preset="tiny")
    b, tt, c = 2, cfg.num_segments, cfg.num_classes
    gt = torch.zeros(b, c, tt, dtype=torch.uint8)
    gt[0, 2, 1:3] = 1
    frame = torch.zeros(b, tt, c)
    frame[0, 1:3, 2] = 0.7
    video = torch.zeros(b, c)
    video[0, 2] = 0.9
    preds = {"video_prob": video, "audio_frame_prob": frame, "visual_frame_prob": frame}
    acc = t.metric_accumulator(cfg)
    acc.update(preds, AVBatch(None, None, {"gt_audio": gt, "gt_visual": gt}))
    res = acc.compute()
    assert res["seg_a"] == pytest.approx(1.0) and res["seg_type"] == pytest.approx(1.0)
    assert t.primary_metric == "seg_type"


def test_overfits_a_fixed_batch():
    # the class-token CE starts at a saddle (zero tokens, 0.02-std classifier), hence the higher lr;
    # the load balance as KL (0 when balanced): the official form's floor of E ln E per adapter
    # (16 x 2 ln 2 here) is most of the tiny model's loss and no overfitting can remove it
    losses = overfit_losses("avvp", steps=30, lr=5e-2, lb_form="kl")
    assert losses[-1] <= 0.5 * losses[0], losses


def test_segment_count_mismatch_is_a_clear_error():
    _, cfg, model = build_tiny("avvp")  # built for 4 segments
    batch = make_batch("avvp", get_task("avvp").config(preset="tiny", num_segments=3))
    with pytest.raises(ValueError, match="built for 4 segments, the batch has 3"):
        model(batch)
