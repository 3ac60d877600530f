"""AVS task: S4 / MS3 heads and losses, AVM-KL, metric accumulation, overfitting."""

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
from avmoe.tasks.avs import avm_kl  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("setting", ["s4", "ms3"])
def test_shapes_and_loss_parts(setting):
    t, cfg, model = build_tiny(f"avs-{setting}")
    batch = make_batch("avs", cfg)
    model.train()
    out = model(batch)
    assert out["mask_logits"].shape == (2, cfg.num_segments, cfg.mask_size, cfg.mask_size)
    assert [m.shape[-1] for m in out["v_maps"]] == list(cfg.map_sizes)
    assert all(a.shape == (2 * cfg.num_segments, cfg.channels) for a in out["a_feats"])
    loss, parts = t.loss(out, batch, cfg)
    assert set(parts) == ({"bce", "lb"} if setting == "s4" else {"bce", "avm", "lb"})
    expected = parts["bce"] + (0.5 * parts["avm"] + 0.01 * parts["lb"] if setting == "ms3" else 0.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_s4_loss_uses_only_valid_frames_and_resizes():
    t = get_task("avs")
    cfg = t.config(preset="tiny")
    logits = torch.randn(1, 3, 16, 16)
    masks = (torch.rand(1, 3, 32, 32) > 0.5).to(torch.uint8)
    valid = torch.tensor([[True, False, False]])
    _, parts = t.loss({"mask_logits": logits, "lb_loss": torch.tensor(0.0)},
                      AVBatch(None, None, {"masks": masks, "mask_valid": valid}), cfg)
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    ref = F.binary_cross_entropy(torch.sigmoid(up[0, 0]), masks[0, 0].float())
    assert parts["bce"] == pytest.approx(float(ref), rel=1e-4)


def test_avm_kl_by_hand():
    logits = torch.zeros(1, 1, 4, 4)  # sigma = 0.5 everywhere
    v_map = torch.ones(1, 2, 2, 2) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    a = torch.tensor([[0.0, 0.0]])
    # f_v = 0.5 * (1, 3); KL(softmax(a) || softmax(f_v)) summed
    p_a = torch.tensor([0.5, 0.5])
    p_v = torch.softmax(torch.tensor([0.5, 1.5]), 0)
    expected = float((p_a * (p_a.log() - p_v.log())).sum())
    assert float(avm_kl(logits, [v_map], [a])) == pytest.approx(expected, rel=1e-5)


def official_avm(pred_masks, a_fea_list, v_map_list):
    """AVSBench's ``A_MaskedV_SimmLoss`` with the MS3 script's flags (avg pooling, kl_flag, no
    norm_fea, no threshold), transcribed from yingchengy/AVMOE AVS/avs_scripts/avs_ms3/loss.py:
    the logits are pooled to the map size and *then* passed through the sigmoid."""
    total = 0
    for a_fea, v_map in zip(a_fea_list, v_map_list):
        a_fea = a_fea.view(-1, a_fea.shape[-1])
        down = torch.sigmoid(torch.nn.AdaptiveAvgPool2d(v_map.shape[-2:])(pred_masks))
        masked_v_fea = torch.mul(v_map, down).mean(-1).mean(-1)
        total = total + F.kl_div(masked_v_fea.softmax(dim=-1).log(), a_fea.softmax(dim=-1), reduction="sum")
    return total / len(v_map_list)


def test_avm_kl_pools_logits_then_sigmoid_as_the_official_loss():
    # by hand: logits (0, 2; -2, 4) pooled to 1x1 -> sigma(1) = 0.731059 (official order);
    # the probabilities pooled -> (0.5 + 0.880797 + 0.119203 + 0.982014) / 4 = 0.620503
    logits = torch.tensor([[0.0, 2.0], [-2.0, 4.0]]).view(1, 1, 2, 2)
    v_map = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    a = torch.tensor([[0.0, 0.0]])
    p_a = torch.tensor([0.5, 0.5])
    for mask, m in (("pool_sigmoid", 0.7310585786), ("sigmoid_pool", 0.6205034)):
        p_v = torch.softmax(m * torch.tensor([1.0, 3.0]), 0)
        expected = float((p_a * (p_a.log() - p_v.log())).sum())
        assert float(avm_kl(logits, [v_map], [a], mask)) == pytest.approx(expected, rel=1e-6), mask
    assert get_task("avs-ms3").config(preset="paper").avm_mask == "pool_sigmoid"
    # random maps at 4 scales: value and gradient equal the transcribed official loss
    g = torch.Generator().manual_seed(0)
    lg = (3 * torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)).requires_grad_(True)
    v_maps = [torch.rand(6, 4, s, s, generator=g, dtype=torch.float64) * 4 for s in (8, 4, 2, 1)]
    a_feats = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = avm_kl(lg, v_maps, a_feats)
    (g_ours,) = torch.autograd.grad(ours, lg)
    ref = official_avm(lg.flatten(0, 1).unsqueeze(1), a_feats, v_maps)
    (g_ref,) = torch.autograd.grad(ref, lg)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    (g_other,) = torch.autograd.grad(avm_kl(lg, v_maps, a_feats, "sigmoid_pool"), lg)
    assert not torch.allclose(g_other, g_ref, rtol=1e-3)


def test_metric_accumulates_in_test_batches():
    from avmoe.metrics import avs_fscore, avs_miou

    t = get_task("avs")
    cfg = t.config(preset="tiny")
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 3, 8, 8, generator=g)
    masks = (torch.rand(6, 3, 8, 8, generator=g) > 0.6).to(torch.uint8)
    acc = t.metric_accumulator(cfg)
    for i in range(0, 6, 2):  # loader batches of 2 videos; AVSBench test batches of 4 videos
        acc.update({"mask_prob": probs[i:i + 2]}, AVBatch(None, None, {"masks": masks[i:i + 2]}))
    res = acc.compute()
    assert res["miou"] == pytest.approx(avs_miou(probs, masks.float(), videos_per_batch=4), abs=1e-6)
    assert res["fscore"] == pytest.approx(avs_fscore(probs, masks.float(), videos_per_batch=4), abs=1e-6)


@pytest.mark.parametrize("setting", ["s4", "ms3"])
def test_overfits_a_fixed_batch(setting):
    losses = overfit_losses(f"avs-{setting}", steps=15, lr=3e-3)
    assert losses[-1] <= 0.5 * losses[0], losses
