"""AVQA task: AVST head, negatives from the batch, CE + 0.5 match CE, metric, overfitting."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import build_tiny, make_batch, overfit_losses, single_thread  # noqa: E402

from avmoe.batch import AVBatch  # noqa: E402
from avmoe.tasks import get_task  # noqa: E402
from avmoe.tasks.avqa import question_types  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_shapes_and_loss():
    t, cfg, model = build_tiny("avqa")
    batch = make_batch("avqa", cfg, batch_size=3)
    model.train()
    out = model(batch)
    assert out["answer_logits"].shape == (3, cfg.num_answers)
    assert out["match_logits"].shape == (3 * cfg.num_segments, 2, 2)
    loss, parts = t.loss(out, batch, cfg)
    assert float(loss.detach()) == pytest.approx(parts["qa"] + 0.5 * parts["match"], rel=1e-5)
    ref = F.cross_entropy(out["match_logits"].reshape(-1, 2), torch.tensor([1, 0]).repeat(3 * cfg.num_segments))
    assert parts["match"] == pytest.approx(float(ref.detach()), rel=1e-5)
    assert t.predict(out, batch)["answer"].shape == (3,)


def test_negatives_are_the_rolled_frames_through_the_frozen_swin():
    t, cfg, model = build_tiny("avqa")
    model.eval()
    batch = make_batch("avqa", cfg, batch_size=2)
    seen = []
    orig = model.trunk.frozen_visual_tokens
    model.trunk.frozen_visual_tokens = lambda frames: (seen.append(frames), orig(frames))[1]
    with torch.no_grad():
        model(batch)
    inputs = model.preprocess(batch)
    n = cfg.num_segments
    assert torch.equal(seen[0][:n], inputs.frames[n:]) and torch.equal(seen[0][n:], inputs.frames[:n])


def test_question_type_formats():
    assert question_types(torch.tensor([0, 8])) == [0, 8]
    assert question_types(torch.tensor([[0, 1], [2, 4]])) == [("Audio", "Comparative"), ("Audio-Visual", "Temporal")]
    assert question_types([("Visual", "Location")]) == [("Visual", "Location")]


def test_metric_accumulator():
    t = get_task("avqa")
    acc = t.metric_accumulator(t.config(preset="tiny"))
    acc.update({"answer": torch.tensor([1, 2, 3])},
               AVBatch(None, None, {"answer": torch.tensor([1, 0, 3]), "question_type": torch.tensor([0, 0, 8])}))
    res = acc.compute()
    assert res["Overall"] == pytest.approx(2 / 3) and res["Audio/Counting"] == pytest.approx(0.5)
    assert t.primary_metric == "Overall"


def test_overfits_a_fixed_batch():
    losses = overfit_losses("avqa", steps=15, lr=3e-3)
    assert losses[-1] <= 0.5 * losses[0], losses
