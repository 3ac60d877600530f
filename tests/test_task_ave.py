"""AVE task: head shapes, loss, prediction rule, metric, overfitting a fixed batch."""

from __future__ import annotations

import math
import os
import sys

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


def test_shapes_loss_predict():
    t, cfg, model = build_tiny("ave")
    batch = make_batch("ave", cfg, batch_size=3)
    out = model(batch)
    assert out["is_event"].shape == (3, 4) and out["event_logits"].shape == (3, 28)
    assert out["av_score"].shape == (3, 28) and out["lb_loss"].shape == ()
    loss, parts = t.loss(out, batch, cfg)
    assert loss.ndim == 0 and set(parts) == {"event", "cls", "av", "lb"}
    assert float(loss.detach()) == pytest.approx(parts["event"] + parts["cls"] + parts["av"], rel=1e-5)  # lb weight 0
    preds = t.predict(out, batch)
    assert preds["labels"].shape == (3, 4) and preds["labels"].device.type == "cpu"


def test_loss_targets_and_prediction_rule():
    t = get_task("ave")
    cfg = t.config(preset="tiny")
    is_event = torch.tensor([[2.0, 0.0, -1.0, 3.0]])
    logits = torch.zeros(1, 28)
    logits[0, 5] = 4.0
    out = {"is_event": is_event, "event_logits": logits, "av_score": logits, "lb_loss": torch.tensor(0.0)}
    batch = AVBatch(frames=None, audio=None, targets={"segment_labels": torch.tensor([[5, 28, 28, 5]])})
    loss, parts = t.loss(out, batch, cfg)
    fg = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(is_event, fg)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([5]))
    assert parts["event"] == pytest.approx(float(bce)) and parts["cls"] == pytest.approx(float(ce))
    # sigma(0) = 0.5 is not > 0.5: background
    assert t.predict(out, batch)["labels"].tolist() == [[5, 28, 28, 5]]
    # one-hot (B, T, 29) targets are accepted too
    onehot = torch.nn.functional.one_hot(torch.tensor([[5, 28, 28, 5]]), 29).float()
    loss2, _ = t.loss(out, AVBatch(frames=None, audio=None, targets={"segment_labels": onehot}), cfg)
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()))


def test_metric_accumulator():
    t = get_task("ave")
    acc = t.metric_accumulator(t.config(preset="tiny"))
    gt = torch.tensor([[5, 28, 28, 5], [1, 1, 1, 28]])
    acc.update({"labels": torch.tensor([[5, 28, 5, 5], [1, 1, 1, 28]])}, AVBatch(None, None, {"segment_labels": gt}))
    acc.update({"labels": torch.tensor([[0, 0, 0, 0]])}, AVBatch(None, None, {"segment_labels": gt[:1] * 0}))
    assert acc.compute()["acc"] == pytest.approx(11 / 12)
    acc.reset()
    assert math.isnan(acc.compute()["acc"])
    assert t.primary_metric == "acc"


def test_overfits_a_fixed_batch():
    losses = overfit_losses("ave", steps=20, lr=3e-3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] <= 0.5 * losses[0], losses
