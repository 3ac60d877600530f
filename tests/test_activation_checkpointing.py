"""Activation checkpointing of the trunk (``AVModel.set_grad_checkpointing``): every block that a
gradient passes through is recomputed in the backward, and a training step with it is the same
step as without it, bit for bit: loss, every trainable parameter's gradient, and the adapters'
buffers (router telemetry, BatchNorm running statistics), which the recomputation must not count
twice. Off, nothing is checkpointed."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import build_tiny, make_batch, open_gates_, single_thread  # noqa: E402

import avmoe.models.trunk as trunk_module  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def counted(monkeypatch):
    """Count the trunk's ``checkpoint`` calls (still running the real one)."""
    calls: list[str] = []
    real = trunk_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", type(fn).__name__))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(trunk_module, "checkpoint", counting)
    return calls


def _expected_checkpoints(trunk, per_pair: int = 1) -> int:
    """Adapted pairs (``per_pair`` checkpoints each), plus every frozen block that runs alone
    after the first adapter (its input then carries a gradient)."""
    n, k, seen_adapter = 0, 0, False
    for pairs in trunk.pairing:
        for j in pairs:
            if j is None:
                n += seen_adapter
                continue
            if trunk._pair_keys[k] is not None:
                n, seen_adapter = n + per_pair, True
            else:
                n += 2 * seen_adapter  # the visual and the audio block, each on its own
            k += 1
    return n


def _step(model, task, cfg, batch):
    """One training step's forward + backward: loss, gradients and the buffers it leaves."""
    torch.manual_seed(1)  # the same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    loss, _ = task.loss(model(batch), batch, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers


@pytest.mark.parametrize("compiled_path", [False, True], ids=["eager", "compiled-path"])
@pytest.mark.parametrize("overrides", [{}, {"num_skip": 1}])
def test_checkpointing_gives_identical_gradients_and_buffers(counted, monkeypatch, overrides, compiled_path):
    # the tiny AVE preset: 1:1 pairs in stages 0, 1 and 3, a 3:1 stage 2 (two unpaired Swin
    # blocks), num_skip=2 leaves stages 1 and 3 unadapted; adapters with BatchNorm and routers.
    # compiled-path: what runs under torch.compile (an adapted pair's frozen sub-layers
    # checkpointed one by one, its adapters not), taken here in eager mode
    monkeypatch.setattr(trunk_module, "_compiling", lambda: compiled_path)
    task, cfg, model = build_tiny("ave", **overrides)
    open_gates_(model, 0.5)  # adapters change the output (zero gates would make them inert)
    model.train()
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.trunk.adapters.modules())
    assert model.trunk.routers()
    batch = make_batch("ave", cfg)
    start = {n: b.clone() for n, b in model.named_buffers()}

    plain = _step(model, task, cfg, batch)
    assert counted == []  # off: the plain forward
    with torch.no_grad():  # back to the same starting buffers for the second step
        for n, b in model.named_buffers():
            b.copy_(start[n])
    model.set_grad_checkpointing(True)
    ckpt = _step(model, task, cfg, batch)

    assert len(counted) == _expected_checkpoints(model.trunk, 3 if compiled_path else 1) >= 2
    if compiled_path:  # the attention and MLP sub-layers of the Swin block, the whole audio block
        assert "_adapted_pair" not in counted and {"_visual_attn", "_visual_mlp"} <= set(counted), counted
    else:  # adapted pairs as one unit, and frozen blocks on their own (stage 2's unpaired Swin blocks)
        assert "_adapted_pair" in counted and any(c != "_adapted_pair" for c in counted), counted
    assert torch.equal(plain[0], ckpt[0])
    assert plain[1].keys() == ckpt[1].keys() and plain[1]
    for name in plain[1]:
        assert torch.equal(plain[1][name], ckpt[1][name]), name
    changed = [n for n in start if not torch.equal(start[n], plain[2][n])]
    assert any("stat_" in n for n in changed) and any("running_mean" in n for n in changed)
    for name in plain[2]:  # router telemetry and BN running stats counted once, not twice
        assert torch.equal(plain[2][name], ckpt[2][name]), name


@pytest.mark.parametrize("compiled_path", [False, True], ids=["eager", "compiled-path"])
def test_checkpointing_keeps_fewer_activations(counted, monkeypatch, compiled_path):
    """What it is for: the autograd graph holds fewer saved tensors (counted with saved-tensor
    hooks: inside a checkpointed block only its inputs are kept)."""
    monkeypatch.setattr(trunk_module, "_compiling", lambda: compiled_path)
    task, cfg, model = build_tiny("ave")
    open_gates_(model, 0.5)
    model.train()
    batch = make_batch("ave", cfg)

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = task.loss(model(batch), batch, cfg)
        loss.backward()
        return total

    plain = saved_bytes()
    model.set_grad_checkpointing(True)
    ckpt = saved_bytes()
    assert ckpt < 0.8 * plain, (ckpt, plain)


def test_no_checkpointing_without_gradients(counted):
    task, cfg, model = build_tiny("ave")
    model.set_grad_checkpointing(True)
    model.eval()
    batch = make_batch("ave", cfg)
    with torch.no_grad():
        model(batch)
    assert counted == []
