"""Model-side figures of the capacity planner (``python -m data_pipeline plan``).

``data_pipeline`` never imports ``avmoe`` at module level (the data layer must not depend on the
model layer), so ``data_pipeline.capacity`` loads this module by name
(``importlib.import_module("avmoe.capacity_model")``) and asks it, for one task and preset:

* ``model_figures``: FLOPs per training sample from the *same* counter as the MFU gauge
  (``avmoe.telemetry.flops.flops_per_sample``: ``FlopCounterMode`` over one forward + backward
  of the training loss, as ``avmoe.train.trainer.Trainer._measure_flops`` calls it), on the
  task's model built from the preset with random init (the presets name no weight file; nothing
  is downloaded), on CPU, with probe batches of one and two samples in the shards' format
  (``flops_at``: the count at any batch size from the two); and the
  parameter / buffer counts a DeepSpeed checkpoint of ``avmoe.train.checkpoint.save`` holds
  (trainable parameters and the module's persistent buffers; frozen parameters are excluded
  with ``exclude_frozen_parameters=True``);
* ``model_key``: the cache key of those figures (cheap: builds the config, not the model);
* ``peak_flops`` / ``gpu_names``: the MFU gauge's device peak table
  (``avmoe.telemetry.flops.peak_flops_for``);
* ``task_names``: the task and variant names a job takes.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch


def task_names() -> list[str]:
    from avmoe.tasks import task_variants

    return list(task_variants())


def _task_and_config(task_name: str, preset: str, manifest: dict | None):
    """(task, cfg); ``LookupError`` naming the known tasks, ``ValueError`` for a bad preset."""
    from avmoe.config import ConfigError
    from avmoe.tasks import get_task

    try:
        task = get_task(task_name)
    except KeyError:
        raise LookupError(f"unknown task {task_name!r}; known: {', '.join(task_names())}") from None
    overrides = task.model_keys(manifest) if manifest else {}
    try:
        cfg = task.config(preset=preset, **overrides)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return task, cfg


def model_key(task_name: str, preset: str, manifest: dict | None = None,
              frame_size: int = 192) -> str:
    """Cache key of ``model_figures``: task, preset, probe frame size and a hash of the full
    model config (the shards' vocabularies and segment count included) and torch's version."""
    task, cfg = _task_and_config(task_name, preset, manifest)
    blob = json.dumps({"cfg": cfg.to_dict(), "torch": torch.__version__}, sort_keys=True,
                      default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{task.full_name}/{preset}/T{cfg.num_segments}/{frame_size}px/{digest}"


def dataset_of(task_name: str) -> str:
    """The ``data_pipeline`` dataset the task trains on (its training split's)."""
    task, _ = _task_and_config(task_name, "tiny", None)
    return task.dataset


PROBE_BATCHES = (1, 2)


def flops_at(figures: dict[str, Any], batch_size: int) -> float:
    """FLOPs per sample at ``batch_size`` from ``model_figures``' affine fit of the step's FLOPs
    in the batch size (``fixed + batch * per_sample``, fitted on the probe batches 1 and 2):
    ``fixed / batch + per_sample``. Equal to the counter's own value at batch 1 and 2, and at
    every batch where the step's FLOPs are affine in it (every task's training step but CMG
    pre-training, whose cross-sample losses add in-batch O(B^2) terms)."""
    return figures["flops_fixed"] / batch_size + figures["flops_marginal"]


def model_figures(task_name: str, preset: str, manifest: dict | None = None,
                  frame_size: int = 192, seed: int = 0) -> dict[str, Any]:
    """FLOPs (per sample, at the probe batches 1 and 2, see ``flops_at``), parameter and
    buffer counts and the training defaults of one task and preset (see the module docstring).
    ``manifest``: a split's manifest whose model keys (``Task.model_keys``: segments,
    vocabularies) the trainer would apply."""
    from avmoe.telemetry.flops import flops_per_sample

    task, cfg = _task_and_config(task_name, preset, manifest)
    t0 = time.perf_counter()
    step: dict[int, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.build_model(cfg)  # random init: the presets name no weight file
        model.train()  # as the trainer measures it
        for b in PROBE_BATCHES:
            batch = task.example_batch(cfg, batch_size=b, seed=seed,
                                       frame_hw=(frame_size, frame_size))
            step[b] = flops_per_sample(model, lambda m, x: task.loss(m(x), x, cfg)[0], batch) * b
    marginal = step[2] - step[1]
    params = dict(model.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    # what DeepSpeed's module_state_dict(exclude_frozen_parameters=True) keeps besides the
    # trainable parameters: the persistent buffers (state_dict entries that are no parameter)
    buffers = [v for k, v in model.state_dict().items() if k not in params]
    opt = task.training_defaults(preset)
    return {
        "task": task.full_name, "dataset": task.dataset, "preset": preset,
        "num_segments": int(cfg.num_segments), "frame_size": int(frame_size),
        "probe_batches": list(PROBE_BATCHES),
        "flops_step": {str(b): float(v) for b, v in step.items()},
        "flops_fixed": float(step[1] - marginal), "flops_marginal": float(marginal),
        "trainable_params": int(sum(p.numel() for p in trainable)),
        "trainable_tensors": len(trainable),
        "trainable_bytes_per_param": int(trainable[0].element_size()) if trainable else 4,
        "frozen_params": int(sum(p.numel() for p in params.values() if not p.requires_grad)),
        "buffer_bytes": int(sum(b.numel() * b.element_size() for b in buffers)),
        "buffer_tensors": len(buffers),
        "batch_size": int(opt.batch_size or 1), "grad_accum": int(opt.grad_accum or 1),
        "torch": torch.__version__,
        "measure_seconds": round(time.perf_counter() - t0, 2),
        "counter": "avmoe.telemetry.flops.flops_per_sample (FlopCounterMode, forward + backward)",
    }


def gpu_names() -> list[str]:
    from avmoe.telemetry.flops import PEAK_BF16_FLOPS

    return [name for name, _ in PEAK_BF16_FLOPS]


def peak_flops(gpu: str) -> float | None:
    """bf16 dense peak FLOP/s of a device name (``AVMOE_PEAK_FLOPS`` overrides), or None."""
    from avmoe.telemetry.flops import peak_flops_for

    return peak_flops_for(gpu)
