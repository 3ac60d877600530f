"""Checkpoint contents (one Ray Train checkpoint = every rank's files merged in one directory):

* ``ds/`` -- DeepSpeed ``save_checkpoint(tag="state", exclude_frozen_parameters=True)``: the
  trainable parameters and the model's buffers (the frozen backbones are rebuilt from the preset
  / local weight files), optimizer state (partitioned per rank under ZeRO >= 1), LR scheduler,
  step counters, and as its client state the task's auxiliary training state
  (``Task.auxiliary``: tensors and plain values, identical on every rank);
* ``rank-R.json`` -- written by each rank: its ingest state (``ShardStream.state``) and its RNG
  states (torch, numpy, python), as JSON;
* ``trainer.json`` -- rank 0: epoch, batches consumed in it, optimiser step, best-on-validation,
  per-epoch history, every rank's partial train-loss sums of a mid-epoch checkpoint, and ``meta`` (ZeRO stage, world size, task, config) for ``--eval-only``
  (stage 0-2 checkpoints: only the weights, ``load_weights``, on any worker count).

No pickle is trusted on load: DeepSpeed's files are read with ``torch.load(weights_only=True)``
(``avmoe.train.engine.safe_load``); everything else is JSON.

Retention and the best checkpoint follow one rule (``is_new_best``): Ray Train keeps the
``keep_checkpoints`` highest ``select_score``s plus the latest checkpoint, ranking equal scores
by report order, the later one higher (``ray.train._internal.checkpoint_manager.
_insert_into_sorted_list``, Ray 2.60), so the trainer's best on a plateau is the latest of the
equal scores too: the checkpoint Ray ranks first, never deleted while ``keep_checkpoints >= 1``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

TAG = "state"


def is_new_best(score: float, best: float | None) -> bool:
    """Whether an epoch checkpoint scored ``score`` (validation, higher is better) replaces the
    best so far: a higher score, or an equal one (reported later), as Ray Train ranks them.
    NaN is never the best (Ray ranks it below every number)."""
    return not math.isnan(score) and (best is None or score >= best)


def save(engine, d: str, rank: int, *, trainer: dict[str, Any], rank_state: dict[str, Any],
         meta: dict[str, Any], client: dict[str, Any] | None = None) -> None:
    # collective: every rank writes its own shard of the DeepSpeed state
    engine.save_checkpoint(os.path.join(d, "ds"), tag=TAG, client_state=client or {},
                           exclude_frozen_parameters=True)
    with open(os.path.join(d, f"rank-{rank}.json"), "w") as f:
        json.dump(rank_state, f)
    if rank == 0:
        with open(os.path.join(d, "trainer.json"), "w") as f:
            json.dump({"trainer": trainer, "meta": meta}, f, default=float)


def read_meta(d: str) -> dict[str, Any]:
    """``trainer.json`` of checkpoint ``d`` (a local directory or any fsspec URL)."""
    from data_pipeline import storage

    fs, path = storage.filesystem(d)
    try:
        return json.loads(fs.cat_file(storage.join(path, "trainer.json")))
    except FileNotFoundError:
        raise FileNotFoundError(f"{d} is not an avmoe checkpoint (no trainer.json)") from None


def resolve(path: str) -> tuple[str, dict[str, Any]]:
    """A run directory or a checkpoint directory (local path or any fsspec URL) -> (checkpoint
    path, its trainer.json). A run resolves to the checkpoint its results were tested with (its
    best on validation), else its best, else its latest checkpoint. FileNotFoundError names what
    is missing."""
    from data_pipeline import storage

    try:
        return path, read_meta(path)
    except FileNotFoundError:
        pass
    fs, base = storage.filesystem(path)
    try:
        results = json.loads(fs.cat_file(storage.join(base, "results.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        results = {}
    names = [results.get("test_checkpoint"), (results.get("best") or {}).get("checkpoint")]
    try:
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    names += sorted((e for e in entries if e.startswith("epoch-")), reverse=True)
    for name in filter(None, names):
        ckpt = path.rstrip("/") + "/" + name
        try:
            return ckpt, read_meta(ckpt)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{path} holds no checkpoint (no trainer.json in it or in an epoch-* directory)")


def load(engine, d: str, rank: int) -> dict[str, Any]:
    """Restore the engine from checkpoint directory ``d``; returns trainer + this rank's state."""
    meta = read_meta(d)
    world = engine.world_size if hasattr(engine, "world_size") else 1
    saved_world = meta["meta"].get("world_size")
    stage = meta["meta"].get("zero_stage")
    if stage != engine.zero_optimization_stage() or (stage and saved_world != world):
        raise ValueError(f"checkpoint {d} was written with ZeRO stage {stage} on {saved_world} workers; "
                         f"this run has stage {engine.zero_optimization_stage()} on {world} workers "
                         f"(use the same --zero-stage and --workers)")
    path, client = engine.load_checkpoint(os.path.join(d, "ds"), tag=TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {d}/ds")
    rank_file = os.path.join(d, f"rank-{rank}.json")
    rank_state: dict[str, Any] = {}
    if os.path.exists(rank_file):
        with open(rank_file) as f:
            rank_state = json.load(f)
    return {"trainer": meta["trainer"], "meta": meta["meta"], "rank": rank_state, "client": client or {}}


def load_weights(module: torch.nn.Module, d: str) -> dict[str, Any]:
    """Only the trainable weights of a ZeRO 0-2 checkpoint into ``module`` (``--eval-only`` on
    any worker count); returns trainer + meta like ``load``."""
    meta = read_meta(d)
    stage = meta["meta"].get("zero_stage")
    if stage is None or stage > 2:
        raise ValueError(f"checkpoint {d} was written with ZeRO stage {stage}: its weights are "
                         f"partitioned; evaluate it with load() on the same layout")
    sd = trainable_state(d)
    result = module.load_state_dict(sd, strict=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise ValueError(f"checkpoint {d} does not fit this model: unexpected "
                         f"{sorted(result.unexpected_keys)[:5]}, missing trainable {missing[:5]}")
    return {"trainer": meta["trainer"], "meta": meta["meta"], "rank": {}}


def trainable_state(d: str) -> dict[str, torch.Tensor]:
    """The trainable parameters saved in a ZeRO 0-2 checkpoint directory (tests, tooling),
    read with ``weights_only=True``."""
    from avmoe.train.engine import safe_load

    path = os.path.join(d, "ds", TAG, "mp_rank_00_model_states.pt")
    sd = safe_load(path, map_location="cpu")
    return dict(sd["module"])
