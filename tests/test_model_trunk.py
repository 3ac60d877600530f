"""The shared trunk and the full model: init equality, freezing, gradients, missing modality."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import TASK_NAMES, build_tiny, make_batch, open_gates_, single_thread  # noqa: E402

from avmoe.models.trunk import adapted_stages, pair_blocks  # noqa: E402
from avmoe.config import AdapterConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _model(task="ave", seed=0, **overrides):
    return build_tiny(task, seed, **overrides)


def test_pairing_and_stage_skipping():
    assert pair_blocks(2, 2) == [0, 1]
    assert pair_blocks(18, 6) == [None, None, 0, None, None, 1, None, None, 2, None, None, 3,
                                  None, None, 4, None, None, 5]  # Swin blocks 2, 5, ..., 17
    with pytest.raises(ValueError, match="multiple"):
        pair_blocks(5, 2)
    assert adapted_stages(AdapterConfig(num_skip=2), 4) == (0, 2)
    assert adapted_stages(AdapterConfig(num_skip=1), 4) == (0, 1, 2, 3)
    assert adapted_stages(AdapterConfig(adapted_stages=(3,)), 4) == (3,)
    assert adapted_stages(AdapterConfig(kind="none"), 4) == ()


def test_adapter_layout_of_the_tiny_trunk():
    _, _, model = _model("ave")  # num_skip=2: stages 0 and 2 -> pairs b0 (stage 0) and b2 (stage 2)
    names = sorted(model.trunk.adapters)
    assert names == sorted(f"b{k}_{p}_{m}" for k in (0, 2) for p in ("p1", "p2") for m in ("audio", "visual"))
    assert len(model.router_stats()) == 8


@pytest.mark.parametrize("overrides", [
    {},  # moe, v2 UA, BN
    {"kind": "lavish"},
    {"kind": "avpea"},
    {"ua_variant": "paramfree", "num_cma": 2, "bridge": "pool", "num_skip": 1},
    {"ua_variant": "v1", "bridge": "linear", "use_bn": False},
    {"kind": "none"},
])
def test_initial_trunk_equals_frozen_backbones(overrides):
    _, cfg, model = _model("ave", audio_gate=True, **overrides)
    model.train()  # adapters in train mode (BN batch stats); backbones stay in eval mode
    batch = make_batch("ave", cfg)
    inputs = model.preprocess(batch)
    feats = model.trunk(inputs.frames, inputs.audio)
    with torch.no_grad():
        v_ref = model.trunk.visual.forward_frozen(inputs.frames).flatten(1, 2)
        a_ref = model.trunk.audio.forward_frozen(inputs.audio).flatten(1, 2)
    assert torch.equal(feats.v_tokens, v_ref)
    assert torch.equal(feats.a_tokens, a_ref)
    assert feats.v_tokens.std() > 0.1  # a real computation, not an identity backbone
    assert [tuple(s.shape[1:3]) for s in feats.v_stages] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [tuple(s.shape[1:3]) for s in feats.a_stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_gateless_audio_adapters_act_from_step_zero():
    _, cfg, model = _model("ave", audio_gate=False)
    model.eval()
    inputs = model.preprocess(make_batch("ave", cfg))
    feats = model.trunk(inputs.frames, inputs.audio)
    assert not torch.equal(feats.a_tokens, model.trunk.audio.forward_frozen(inputs.audio).flatten(1, 2))


def test_backbones_frozen_and_kept_in_eval_mode():
    _, _, model = _model("ave")
    model.train()
    assert not model.trunk.visual.training and not model.trunk.audio.training
    assert model.head.training and all(m.training for m in model.trunk.adapters.modules())
    assert not any(p.requires_grad for p in model.trunk.visual.parameters())
    assert not any(p.requires_grad for p in model.trunk.audio.parameters())
    _, _, official = _model("ave", backbone_train_mode=True)
    official.train()
    assert official.trunk.visual.training and official.trunk.audio.training
    assert not any(p.requires_grad for p in official.trunk.audio.parameters())


@pytest.mark.parametrize("task", TASK_NAMES)
def test_gradients_reach_only_trainable_parameters(task):
    t, cfg, model = _model(task)
    open_gates_(model, 0.5)
    model.train()
    batch = make_batch(task, cfg)
    loss, _ = t.loss(model(batch), batch, cfg)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for trainable {name}"
        else:
            assert p.grad is None, f"gradient leaked into frozen {name}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trunk.adapters.", "head.")) for n in trainable)
    adapter_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("trunk.adapters.")]
    assert sum(float(g > 0) for g in adapter_grads) > 0.9 * len(adapter_grads) or cfg.adapter.kind == "none"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_missing_modality(task):
    t, cfg, model = _model(task)
    model.eval()
    batch = make_batch(task, cfg)
    with torch.no_grad():
        for b in (batch.drop("audio"), batch.drop("visual"),
                  type(batch)(frames=None, audio=batch.audio, targets=batch.targets),
                  type(batch)(frames=batch.frames, audio=None, targets=batch.targets)):
            out = model(b)
            assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))
            loss, _ = t.loss(out, b, cfg)
            assert torch.isfinite(loss)


def test_missing_modality_feeds_zeros_for_those_samples():
    _, cfg, model = _model("ave")
    batch = make_batch("ave", cfg)
    batch.visual_present = torch.tensor([False, True])
    batch.audio_present = torch.tensor([True, False])
    inputs = model.preprocess(batch)
    t = cfg.num_segments
    assert torch.count_nonzero(inputs.frames[:t]) == 0 and torch.count_nonzero(inputs.frames[t:]) > 0
    assert torch.count_nonzero(inputs.audio[t:]) == 0 and torch.count_nonzero(inputs.audio[:t]) > 0
    full = model.preprocess(make_batch("ave", cfg))
    assert torch.equal(inputs.frames[t:], full.frames[t:]) and torch.equal(inputs.audio[:t], full.audio[:t])


def test_preprocess_formats():
    _, cfg, model = _model("ave")
    batch = make_batch("ave", cfg)
    u8 = model.preprocess(batch)
    assert u8.frames.shape == (2 * cfg.num_segments, 3, 32, 32) and u8.audio.shape == (8, 32000)
    batch.frames = batch.frames.permute(0, 1, 4, 2, 3).float() / 255  # float (B, T, 3, H, W)
    batch.audio = batch.audio.float() / 32768
    fl = model.preprocess(batch)
    torch.testing.assert_close(fl.frames, u8.frames, atol=1e-5, rtol=0)
    torch.testing.assert_close(fl.audio, u8.audio)
    batch.audio = batch.audio[:, :-5]
    with pytest.raises(ValueError, match="samples"):
        model.preprocess(batch)


def test_frame_resize_official_is_plain_bicubic_and_paper_is_pil_like():
    """A 4x4 step image (columns 0, 0, 255, 255) shrunk to 2x2. Plain bicubic (the official
    tensor Resize of torchvision 0.14: antialias False for tensors, clamp only for uint8) samples
    at x = 2i + 0.5 with the a = -0.75 kernel, weights (-0.09375, 0.59375, 0.59375, -0.09375)
    over neighbours clamped at the border: out = (0.5*0 + 0.59375*0 - 0.09375*1,
    -0.09375*0 + 0.59375*1 + 0.5*1) = (-0.09375, 1.09375), the overshoot kept. Antialiased: PIL's
    bicubic resize of the same uint8 image to within one grey level."""
    import numpy as np
    from PIL import Image

    from avmoe.models.preprocess import AVPreprocessor
    from avmoe.tasks import get_task, list_tasks

    row = torch.tensor([0, 0, 255, 255], dtype=torch.uint8)
    img = row.view(1, 4, 1).expand(4, 4, 3).contiguous()  # (H, W, 3)
    frames = img.view(1, 1, 4, 4, 3)
    grey = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), segment_samples=4)
    plain = AVPreprocessor(2, antialias=False, **grey).frames(frames, 1, 1)[0, 0]
    torch.testing.assert_close(plain, torch.tensor([[-0.09375, 1.09375]] * 2), rtol=0, atol=1e-6)
    aa = AVPreprocessor(2, antialias=True, **grey).frames(frames, 1, 1)[0, 0]
    pil = np.asarray(Image.fromarray(img.numpy()).resize((2, 2), Image.BICUBIC))[..., 0] / 255.0
    torch.testing.assert_close(aa, torch.tensor(pil, dtype=torch.float32), rtol=0, atol=1 / 255)
    assert float(aa.min()) >= 0 and float(aa.max()) <= 1
    for name in list_tasks():  # the official presets resize like the official code
        assert get_task(name).config(preset="official").visual.antialias is False, name
    assert get_task("ave").config(preset="paper").visual.antialias is True


def test_grad_checkpointing_matches():
    t, cfg, model = _model("ave", use_bn=False)
    open_gates_(model, 0.5)
    model.eval()
    batch = make_batch("ave", cfg)

    def run():
        model.zero_grad()
        loss, _ = t.loss(model(batch), batch, cfg)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    l1, g1 = run()
    model.set_grad_checkpointing(True)
    l2, g2 = run()
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
