"""The deterministic sample plan of the streaming ingest: which sample every rank reads, in
which order, for an epoch -- computed from the manifest alone, before any byte is read.

Two-level shuffle, world-size independent
-----------------------------------------
1. **Shard order**: the split's shards are permuted by ``rng(seed, epoch)``; the *global
   order* is every sample of the first shard of that permutation (in tar order), then the next
   shard's, and so on.
2. **Window shuffle**: the global order is cut into windows of ``shuffle_buffer`` positions and
   each window is permuted by ``rng(seed, epoch, window)``.

The result, ``epoch_order(...)``, depends on (manifest, seed, epoch, shuffle_buffer) only --
*not* on the world size or the batch size. Ranks are dealt from it one global batch at a time:
global batch ``g`` (positions ``[p0 + g*B*W, p0 + (g+1)*B*W)``) gives rank ``r`` the ``B``
positions ``p0 + g*B*W + r*B ...``. Hence after every rank consumed ``k`` batches, exactly the
prefix ``[0, p0 + k*B*W)`` of the epoch order is consumed, whatever W was. That is what makes

* exact resume cheap: start at position ``k*B*W`` and skip nothing else (nothing is read for
  the skipped prefix), and
* a world-size (or batch-size) change on resume well defined: the remaining suffix of the same
  epoch order is re-dealt to the new ranks (see ``RankPlan`` and ``ShardStream.resume``), so no
  sample is repeated or lost within the epoch.

Each rank holds only its ~1/W share of a window's samples, raw and undecoded (see
``data_pipeline.ingest``): the shuffle buffer is global, the memory per rank shrinks with W.

Equal batches: with ``drop_last`` (training) every rank gets ``(N - p0) // (B*W)`` full
batches; the < B*W leftover positions of the epoch are not read. Which samples are left over
changes with every epoch's permutation, so none is left out systematically. Without
``drop_last`` (evaluation, no per-step collectives) the last global batch is dealt in B-chunks
and some ranks get one short or one fewer batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Domain-separation tags so the shard and window streams never reuse a seed sequence.
_SHARD_TAG, _WINDOW_TAG = 0x5A4D, 0x5749


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class SplitIndex:
    """Flat sample ids of a manifest (manifest shard order, tar order within a shard) and the
    per-sample byte span / sha256 needed to read each one."""

    def __init__(self, manifest: dict):
        shards = manifest["shards"]
        self.shard_names = [s["name"] for s in shards]
        counts = np.array([int(s["samples"]) for s in shards], dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.shard_start[-1])
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
        self.keys = [k for s in shards for k in s["keys"]]
        self.spans = [tuple(sp) for s in shards for sp in s["spans"]]
        self.sha256 = [h for s in shards for h in s["sample_sha256"]]
        if not (len(self.keys) == len(self.spans) == len(self.sha256) == self.num_samples):
            raise ValueError("manifest shards disagree: 'samples', 'keys', 'spans' and "
                             "'sample_sha256' must have one entry per sample")

    def item(self, flat: int) -> tuple[int, str, int, int, str]:
        """(shard index, key, offset, length, sha256) of one flat sample id."""
        off, length = self.spans[flat]
        return int(self.shard_of[flat]), self.keys[flat], int(off), int(length), self.sha256[flat]


def epoch_order(index: SplitIndex, seed: int, epoch: int, shuffle: bool,
                shuffle_buffer: int) -> np.ndarray:
    """Flat sample ids in the epoch's global order (see the module docstring)."""
    if not shuffle:
        return np.arange(index.num_samples, dtype=np.int64)
    n_shards = len(index.shard_names)
    perm = _rng(_SHARD_TAG, seed, epoch).permutation(n_shards)
    order = np.concatenate([np.arange(index.shard_start[s], index.shard_start[s + 1])
                            for s in perm]).astype(np.int64)
    w = max(1, int(shuffle_buffer))
    if w > 1:
        for j, lo in enumerate(range(0, len(order), w)):
            seg = order[lo:lo + w]
            order[lo:lo + w] = seg[_rng(_WINDOW_TAG, seed, epoch, j).permutation(len(seg))]
    return order


@dataclass(frozen=True)
class RankPlan:
    """The batches of one rank for one epoch, starting at global position ``start``.

    ``batches[j]`` is a list of flat sample ids; ``end_position(j)`` the global position
    consumed once every rank finished its batches before ``j`` (the prefix property of the
    module docstring)."""

    start: int
    batch_size: int
    world_size: int
    rank: int
    batches: list[np.ndarray]
    num_samples: int  # of the epoch

    def end_position(self, batches_done: int) -> int:
        """Global samples consumed after every rank consumed ``batches_done`` batches of this
        plan; clipped to the epoch (the last, short global batch without drop_last)."""
        return min(self.num_samples, self.start + batches_done * self.batch_size * self.world_size)


def num_full_batches(num_samples: int, start: int, batch_size: int, world_size: int) -> int:
    return max(0, (num_samples - start) // (batch_size * world_size))


def rank_plan(order: np.ndarray, batch_size: int, world_size: int, rank: int, start: int = 0,
              drop_last: bool = True) -> RankPlan:
    """Deal ``order[start:]`` to ``world_size`` ranks one global batch at a time."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(order)
    if not 0 <= start <= n:
        raise ValueError(f"start position {start} is outside the epoch's {n} samples")
    gb = batch_size * world_size
    full = num_full_batches(n, start, batch_size, world_size)
    batches = []
    for g in range(full):
        lo = start + g * gb + rank * batch_size
        batches.append(order[lo:lo + batch_size])
    if not drop_last:
        lo = start + full * gb + rank * batch_size
        if lo < n:
            batches.append(order[lo:min(lo + batch_size, n)])
    return RankPlan(start, batch_size, world_size, rank, batches, n)
