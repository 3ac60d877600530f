"""DeepSpeed inside a Ray Train worker: config, optimiser over the trainable parameters only,
LR schedule, and checkpoint loading that never unpickles arbitrary objects.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU);
``deepspeed.initialize`` reuses it, so no DeepSpeed launcher is involved
(../shared/spec/stack.md §7). The optimiser is a plain torch one (Adam/AdamW): DeepSpeed's
FusedAdam would JIT-compile an op (~85 s) on CPU, and torch's AdamW is in DeepSpeed's list of
ZeRO-supported optimisers, so ZeRO 1-3 wrap it without ``zero_allow_untested_optimizer``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``over`` wins, nested dicts are merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def use_bf16(precision: str, on_gpu: bool) -> bool:
    return precision == "bf16" or (precision == "auto" and on_gpu)


def deepspeed_config(*, micro_batch: int, grad_accum: int, zero_stage: int, bf16: bool,
                     grad_clip: float, user: dict[str, Any] | None = None) -> dict[str, Any]:
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        # 0 disables clipping in DeepSpeed
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        # bf16 via torch autocast (fp32 master weights, bf16 matmuls/convs): DeepSpeed's
        # "bf16" mode would cast the whole module, frozen backbones and the uint8 -> float
        # preprocessing included, to bf16 and mismatch the float32 inputs it builds
        "torch_autocast": {"enabled": bool(bf16), "dtype": "bfloat16"},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        ours["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    merged = merge(ours, user or {})
    if "train_batch_size" in merged and "train_batch_size" not in (user or {}):
        merged.pop("train_batch_size")
    return merged


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be adam or adamw; got {name!r}")


def build_scheduler(optimizer, opt, steps_per_epoch: int):
    """Spec §3 schedules are per epoch (StepLR(step_size epochs, gamma)); DeepSpeed steps the
    scheduler once per optimiser step, so the step size is converted to optimiser steps --
    the same learning rate at every step as an epoch-stepped StepLR. ``opt``: the resolved
    ``OptimConfig``."""
    if opt.scheduler != "step":
        return None
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, opt.step_size * steps_per_epoch),
                                           gamma=opt.gamma)


def initialize(model: torch.nn.Module, optimizer, scheduler, config: dict[str, Any]):
    # DeepSpeed reads its accelerator once; on a GPU machine running a CPU job (use_gpu=False)
    # it must not pick CUDA.
    if not torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from avmoe.console import captured_stdout

    with captured_stdout():  # DeepSpeed prints its op loads on every rank (kept with --verbose)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    make_loads_safe(engine)
    return engine, optimizer, scheduler


# --------------------------------------------------------------------------- safe loading


def _safe_globals() -> list:
    """The few non-tensor classes DeepSpeed writes into its checkpoint files."""
    out: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:
        pass
    import collections

    out += [collections.OrderedDict, collections.defaultdict, dict, list, set, tuple, torch.Size]
    return out


def safe_load(path: str, map_location=None):
    """``torch.load(weights_only=True)`` with DeepSpeed's own classes allow-listed: a crafted
    checkpoint cannot run code while being loaded."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def make_loads_safe(engine) -> None:
    """DeepSpeed 0.19.8's TorchCheckpointEngine loads with unpickling allowed; route every
    checkpoint read of this engine through :func:`safe_load` instead."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return

    def load(path, map_location=None):
        return safe_load(path, map_location=map_location)

    ce.load = load
