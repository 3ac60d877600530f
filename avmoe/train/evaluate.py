"""Distributed evaluation with the exact (official) metrics.

Each rank predicts its share of the split (the ingest deals every sample exactly once with
``drop_last=False``); the per-sample predictions and targets are gathered to every rank,
de-duplicated by key, put back in the split's manifest order, and fed to one
``task.metric_accumulator`` -- so the number equals what a single process evaluating the split
in order computes (the official metrics are not per-batch decomposable: per-video means,
AVSBench's per-test-batch F-score threshold).

Under ZeRO-3 every forward is a collective (parameters are gathered layer by layer), so ranks
with fewer batches repeat their last batch (outputs discarded) until every rank is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from avmoe.batch import AVBatch


@dataclass
class EvalResult:
    metrics: dict[str, float]
    items: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (key, preds, targets) in split order
    num_samples: int


FRAMES = "_frames"  # an item's input frames (B=1, T, H, W, 3) uint8, for the pictures


def _split_rows(preds: dict[str, Any], batch: AVBatch, frames_of: set[str] = frozenset()):
    n = batch.batch_size
    for i, key in enumerate(batch.keys):
        p = {k: (v[i:i + 1].cpu() if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v)
             for k, v in preds.items()}
        t = {k: v[i:i + 1].cpu() for k, v in batch.targets.items()}
        if key in frames_of and batch.frames is not None and batch.frames.dtype == torch.uint8:
            t[FRAMES] = batch.frames[i:i + 1].cpu()
        yield key, p, t


def _gather_group():
    """Object gathers go over gloo (NCCL would need the pickles on the GPU)."""
    global _GLOO
    if dist.get_backend() == "gloo":
        return None
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo")
    return _GLOO


_GLOO = None


def manifest_order(stream) -> dict[str, int]:
    keys = [k for shard in stream.manifest.get("shards", []) for k in shard.get("keys", [])]
    return {k: i for i, k in enumerate(keys)}


@torch.no_grad()
def evaluate(engine, task, cfg, stream, *, device, drop: str | None = None, limit: int | None = None,
             zero3: bool = False, keep_frames: int = 0) -> EvalResult:
    """``keep_frames``: the first N samples of the split (manifest order) keep their input frames
    in their targets (``FRAMES``), for the task's pictures."""
    engine.eval()
    frames_of = set(list(manifest_order(stream))[:keep_frames]) if keep_frames else frozenset()
    rows: list = []
    last: AVBatch | None = None
    n_batches = 0
    it = stream.epoch(0)
    try:
        for batch in it:
            if limit is not None and n_batches >= limit:
                break
            if drop:
                batch = batch.drop(drop)
            b = batch.to(device)
            out = engine(b)  # bf16 autocast, when on, is the engine's (torch_autocast config)
            preds = task.predict(out, b)
            rows.extend(_split_rows(preds, batch, frames_of))
            last = b
            n_batches += 1
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed and zero3:
        t = torch.tensor([n_batches], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if last is None and int(t) > n_batches:
            raise RuntimeError("ZeRO-3 evaluation: this rank got no batch of the split while others did; "
                               "use fewer workers for so small a split")
        for _ in range(int(t) - n_batches):
            engine(last)
    if distributed:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows, group=_gather_group())
        rows = [r for part in gathered for r in part]
    order = manifest_order(stream)
    seen: dict[str, tuple] = {}
    for r in rows:
        seen.setdefault(r[0], r)
    items = sorted(seen.values(), key=lambda r: (order.get(r[0], len(order)), r[0]))
    acc = task.metric_accumulator(cfg)
    for key, p, t in items:
        acc.update(p, AVBatch(frames=None, audio=None, targets={k: v for k, v in t.items() if k != FRAMES},
                              keys=[key]))
    metrics = {k: float(v) for k, v in acc.compute().items()} if items else {}
    engine.train()
    return EvalResult(metrics=metrics, items=items, num_samples=len(items))
