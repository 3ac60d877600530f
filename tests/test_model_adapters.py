"""Adapters in isolation: bridge, router + load balance, experts, MoE mixing, LAVisH, AV-PEA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avmoe.config import AdapterConfig
from avmoe.tasks import get_task
from avmoe.models.adapters.avpea import ChannelResample
from avmoe.models.adapters import (
    AVPEAAdapter, Bottleneck, CrossModalExpert, LavishAdapter, ModalityBridge, MoEAdapter, Router,
    StreamSpec, UnimodalExpert, load_balance_loss,
)

X = StreamSpec(dim=16, hw=(4, 4))  # self stream: 16 tokens of width 16
Y = StreamSpec(dim=8, hw=(8, 8))  # guide: 64 tokens of width 8


def _cfg(**kw) -> AdapterConfig:
    base = dict(num_tokens=4, reduction=4, groups=2, router_hidden=(16, 8))
    base.update(kw)
    return AdapterConfig(**base)


def _xy(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, X.tokens, X.dim, generator=g), torch.randn(n, Y.tokens, Y.dim, generator=g)


def official_load_balance(gating_probs: torch.Tensor) -> torch.Tensor:
    """The released code's term, transcribed from ``MoEAdapter.compute_load_balancing_loss``
    (yingchengy/AVMOE: AVVP/nets/mgn.py, AVS/avs_scripts/*/model/PVT_AVSModel_v2.py), called
    there on the router output of shape (N, 1, E): the token means keep their axis."""
    expert_probs_mean = torch.mean(gating_probs, dim=0)  # (1, E)
    uniform_distribution = torch.full_like(expert_probs_mean, 1.0 / expert_probs_mean.size(0))
    return F.kl_div(expert_probs_mean.log(), uniform_distribution, reduction="batchmean")


def test_load_balance_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # mean (0.75, 0.25)
    # KL(U || p̄) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 (-0.405465 + 0.693147)
    kl = 0.5 * (math.log(0.5 / 0.75) + math.log(0.5 / 0.25))
    assert kl == pytest.approx(0.1438410362, abs=1e-9)
    assert float(load_balance_loss(probs, "kl")) == pytest.approx(kl, abs=1e-6)
    assert float(load_balance_loss(probs, "kl_over_e")) == pytest.approx(kl / 2, abs=1e-6)
    # official: -(ln 0.75 + ln 0.25) = 1.673976 = E (KL + ln E); the default form
    assert -(math.log(0.75) + math.log(0.25)) == pytest.approx(1.6739764336, abs=1e-9)
    assert float(load_balance_loss(probs)) == pytest.approx(1.6739764336, abs=1e-6)
    assert float(official_load_balance(probs[:, None, :])) == pytest.approx(1.6739764336, abs=1e-6)
    # (what "kl_over_e" read into the code: batchmean on a 1-D (E,) tensor divides by E)
    one_d = F.kl_div(probs.mean(0).log(), torch.full((2,), 0.5), reduction="batchmean")
    assert float(one_d) == pytest.approx(kl / 2, abs=1e-6)
    balanced = torch.full((5, 4), 0.25)
    assert float(load_balance_loss(balanced, "kl")) == pytest.approx(0.0, abs=1e-7)
    assert float(load_balance_loss(balanced)) == pytest.approx(4 * math.log(4), abs=1e-6)
    with pytest.raises(ValueError, match="official, kl, kl_over_e"):
        load_balance_loss(balanced, "mean")


@pytest.mark.parametrize("experts", [2, 4])  # AVVP 1 CMA + 1 UA; MS3 2 + 2
def test_load_balance_official_value_and_gradient(experts):
    """Value and gradient equal the official code's on its (N, 1, E) router output; the
    gradient is E^2 times that of KL/E (4x AVVP, 16x MS3) and E times that of KL."""
    g = torch.Generator().manual_seed(experts)
    logits = torch.randn(6, experts, generator=g, dtype=torch.float64)
    grads = {}
    for form in ("official", "kl", "kl_over_e", "reference"):
        x = logits.clone().requires_grad_(True)
        p = torch.softmax(x, -1)
        value = official_load_balance(p[:, None, :]) if form == "reference" else load_balance_loss(p, form)
        value.backward()
        grads[form] = (float(value.detach()), x.grad)
    assert grads["official"][0] == pytest.approx(grads["reference"][0], rel=1e-12)
    torch.testing.assert_close(grads["official"][1], grads["reference"][1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads["official"][1], experts ** 2 * grads["kl_over_e"][1])
    torch.testing.assert_close(grads["official"][1], experts * grads["kl"][1])
    kl = grads["kl"][0]
    assert grads["official"][0] == pytest.approx(experts * (kl + math.log(experts)), rel=1e-12)


def test_router_rows_sum_to_one_and_stats():
    torch.manual_seed(0)
    r = Router(2 * 16, 3, hidden=(16, 8))
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    w = r(x, y)
    assert w.shape == (5, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    r(x, y)
    stats = r.stats()
    torch.testing.assert_close(stats["mean_weight"], w.detach().mean(0))
    assert int(stats["argmax_count"].sum()) == 10
    torch.testing.assert_close(stats["argmax_count"], 2 * torch.bincount(w.argmax(-1), minlength=3))
    r.reset_stats()
    assert int(r.stats()["argmax_count"].sum()) == 0
    assert "stat_weight_sum" not in r.state_dict()  # telemetry never enters checkpoints


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    r = Router(8, 2, hidden=(4,), noise_std=0.5)
    x = torch.randn(4, 4)
    r.eval()
    torch.testing.assert_close(r(x, x), r(x, x))
    r.train()
    assert not torch.equal(r(x, x), r(x, x))


def test_bridge_modes_shapes_and_parameter_counts():
    _, y = _xy()
    for mode in ("dense", "pool", "linear"):
        out = ModalityBridge(X, Y, mode)(y)
        assert out.shape == (3, Y.tokens if mode == "linear" else X.tokens, X.dim)
    dense = sum(p.numel() for p in ModalityBridge(X, Y, "dense").parameters())
    pool = sum(p.numel() for p in ModalityBridge(X, Y, "pool").parameters())
    assert dense == (X.tokens * Y.tokens + X.tokens) + (Y.dim * X.dim + X.dim)
    assert pool == Y.dim * X.dim + X.dim
    # pooling a 8x8 grid to 4x4 averages 2x2 blocks
    b = ModalityBridge(X, Y, "pool")
    with torch.no_grad():
        b.dim_map.weight.copy_(torch.eye(X.dim, Y.dim))
        b.dim_map.bias.zero_()
    grid = torch.arange(64.0).view(1, 64, 1).expand(1, 64, 8)
    out = b(grid)[0, :, 0].detach()
    assert float(out[0]) == pytest.approx((0 + 1 + 8 + 9) / 4)


def test_bottleneck_grouping_and_init():
    bn = Bottleneck(16, reduction=4, groups=2, use_bn=True, relu=True)
    assert bn.down.weight.shape == (4, 8, 1) and bn.up.weight.shape == (16, 2, 1)  # block-diagonal
    assert bn(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="divisible"):
        Bottleneck(16, reduction=8, groups=4, use_bn=False, relu=False)  # 2 hidden channels, 4 groups


@pytest.mark.parametrize("variant", ["none", "paramfree", "v1", "v2"])
def test_unimodal_variants_zero_at_init_then_active(variant):
    torch.manual_seed(0)
    x, _ = _xy()
    ua = UnimodalExpert(X.dim, _cfg(ua_variant=variant, mha_heads=2), gate=True)
    assert torch.equal(ua(x), torch.zeros_like(x))
    with torch.no_grad():
        ua.out_gate.fill_(1.0)
    ua.eval()
    assert ua(x).abs().sum() > 0
    assert not any(isinstance(m, torch.nn.ReLU) for m in ua.bottleneck.modules())  # linear UA bottleneck


def official_ua_v1(ua: UnimodalExpert, x: torch.Tensor) -> torch.Tensor:
    """The official S4 unimodal expert "v1", transcribed from ``ExpertAdapter.forward``
    (yingchengy/AVMOE AVS/avs_scripts/avs_s4/model/PVT_AVSModel_v2.py): its
    ``MultiheadAttention(input_dim, num_heads=4, dropout=0.2)`` has no ``batch_first`` and is
    called on the (B*T, N, D) tokens, then LN -> grouped Down -> Up (no ReLU) -> LN -> gate."""
    mha = torch.nn.MultiheadAttention(ua.mha.embed_dim, ua.mha.num_heads, dropout=ua.mha.dropout)
    mha.load_state_dict(ua.mha.state_dict())
    mha = mha.to(x.dtype).eval()
    attended, _ = mha(x, x, x)
    return ua.out_gate * ua.bottleneck(attended)


def test_unimodal_v1_attends_across_frames_in_official_preset():
    torch.manual_seed(0)
    x, _ = _xy(n=5)
    x = x.double()
    experts = {}
    for axis in ("tokens", "frames"):
        torch.manual_seed(1)  # same weights for both
        ua = UnimodalExpert(X.dim, _cfg(ua_variant="v1", mha_heads=2, mha_axis=axis), gate=True).double().eval()
        with torch.no_grad():
            ua.out_gate.fill_(1.0)
        experts[axis] = ua
    official = official_ua_v1(experts["frames"], x)
    torch.testing.assert_close(experts["frames"](x), official, rtol=1e-12, atol=1e-12)
    assert (experts["tokens"](x) - official).abs().max() > 1e-2  # attention within a frame differs
    # "frames": frame 0's output depends on the other frames of the batch (other videos); "tokens": never
    x2 = x.clone()
    x2[1:] += 1.0
    assert not torch.allclose(experts["frames"](x2)[0], experts["frames"](x)[0])
    torch.testing.assert_close(experts["tokens"](x2)[0], experts["tokens"](x)[0], rtol=0, atol=0)
    s4 = get_task("avs-s4")
    assert s4.config(preset="official").adapter.mha_axis == "frames"
    assert s4.config(preset="paper", ua_variant="v1").adapter.mha_axis == "tokens"


def test_cross_modal_expert_uses_guide_only_through_its_gate():
    torch.manual_seed(0)
    x, y = _xy()
    y_hat = ModalityBridge(X, Y)(y)
    cma = CrossModalExpert(X.dim, _cfg(), gate=True).eval()
    with torch.no_grad():
        cma.out_gate.fill_(1.0)
    a = cma(x, y_hat)
    assert torch.equal(a, cma(x, torch.randn_like(y_hat)))  # g_av = 0: fusion off
    with torch.no_grad():
        cma.compress.gate.fill_(0.5)
    assert not torch.equal(a, cma(x, y_hat))
    assert ((cma.compress.latents >= 0) & (cma.compress.latents < 1)).all()  # U[0,1) latents


def test_moe_is_the_router_weighted_sum_of_experts():
    torch.manual_seed(0)
    x, y = _xy()
    moe = MoEAdapter(X, Y, _cfg(num_cma=2, num_ua=1), gate=True).eval()
    out, lb = moe(x, y)
    assert torch.equal(out, torch.zeros_like(x)) and lb.ndim == 0
    for p in moe.parameters():  # open all gates
        if p.numel() == 1:
            torch.nn.init.constant_(p, 0.3)
    out, lb = moe(x, y)
    y_hat = moe.bridge(y)
    w = moe.router(x.mean(1), y_hat.mean(1))
    expected = sum(w[:, e, None, None] * ex(x, y_hat) for e, ex in enumerate(moe.experts))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lb, load_balance_loss(w))


@pytest.mark.parametrize("cls", [LavishAdapter, AVPEAAdapter])
def test_single_adapters_zero_at_init(cls):
    torch.manual_seed(0)
    x, y = _xy()
    ad = cls(X, Y, _cfg(), gate=True)
    out, lb = ad(x, y)
    assert lb is None and torch.equal(out, torch.zeros_like(x))
    ungated = cls(X, Y, _cfg(), gate=False)
    assert ungated(x, y)[0].abs().sum() > 0  # no output gate: active from step 0


def test_avpea_width_maps_by_hand():
    """AV-PEA's width map: a learned Linear (D_y x D_x + D_x parameters) or parameter-free
    channel resampling (groups of channels averaged when shrinking, repeated when growing)."""
    y = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    torch.testing.assert_close(ChannelResample(2)(y), torch.tensor([[[1.5, 3.5]]]))
    torch.testing.assert_close(ChannelResample(4)(torch.tensor([[[1.0, 2.0]]])), torch.tensor([[[1.0, 1.0, 2.0, 2.0]]]))
    x, yy = _xy()
    bottleneck = sum(p.numel() for p in Bottleneck(X.dim, 4, 2, False, relu=True).parameters())
    linear = AVPEAAdapter(X, Y, _cfg(), gate=True)
    light = AVPEAAdapter(X, Y, _cfg(avpea_map="resample"), gate=True)
    assert sum(p.numel() for p in linear.parameters()) == (Y.dim * X.dim + X.dim) + bottleneck + 2
    assert sum(p.numel() for p in light.parameters()) == bottleneck + 2  # bottleneck + two gates
    out, _ = light(x, yy)
    assert torch.equal(out, torch.zeros_like(x))  # zero output gate at init, like every adapter
    with torch.no_grad():
        light.out_gate.fill_(1.0)
        light.cross_gate.fill_(1.0)
    assert light(x, yy)[0].abs().sum() > 0 and light(x, yy)[0].shape == x.shape
