"""Decoding JPEG frames in the consuming process (``IngestConfig.decode_on`` "trainer" or "gpu").

The Ray Data decode tasks (``data_pipeline.decode_task`` with ``decode_frames=False``) still do
the ranged reads, the sha256 check, the tar parse, the schema checks, audio, extras and labels;
they ship each sample's JPEG frame members as one ``bytes`` object (``JPEG``) with their
offsets (``JPEG_OFFSETS``). ``FrameDecoder`` turns such a block into the columns a decoding task
would have produced:

* ``"trainer"``: a thread pool (simplejpeg / libjpeg-turbo releases the GIL) decodes each row's
  frames straight into a preallocated ``(n, T, S, S, 3)`` uint8 array with the decode task's own
  ``decode_frame`` -- same header check, same strict decode, hence bit-identical frames and the
  same ``MemberError`` messages.
* ``"gpu"``: the header / size check on the CPU, then one batched
  ``torchvision.io.decode_jpeg(list, device="cuda")`` (nvJPEG) for the batch's frames, giving a
  CUDA ``(n, T, S, S, 3)`` uint8 tensor. nvJPEG's IDCT is not libjpeg-turbo's: pixels may differ
  by a few levels from the CPU decode, and data that nvJPEG decodes despite damage is not an
  error there (the sha256 check still guarantees the bytes are the packer's). When the batched
  call fails, the batch is decoded frame by frame to name the bad one.

Errors. A row the task already marked bad *after* its frame stage (``FRAMES_PENDING`` and
``ok=False``: e.g. a bad audio or labels member) is decoded too: a bad frame comes first in a
decoding task, so it replaces the later member's error -- the message is what ``decode_on=
"ingest"`` gives for the same sample. Bad rows are zero-filled; the consumer raises or skips
them exactly as in ingest mode.

Ordering. ``submit`` starts a block's decode and returns at once; ``result`` waits. The stream
(``ShardStream._iterate``) submits batch ``j + 1`` before it hands batch ``j`` to the trainer,
so decoding overlaps the training step by one batch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from data_pipeline.decode_task import decode_frame, row_error
from data_pipeline.errors import MemberError
from data_pipeline.sample import (ERR_MEMBER, ERR_SHARD, ERROR, FRAMES, FRAMES_PENDING, JPEG,
                                  JPEG_OFFSETS, KEY, OK, SampleSpec)
from data_pipeline.schema import frame_member

__all__ = ["FrameDecoder", "default_threads"]


def default_threads() -> int:
    """The CPUs this process holds: a Ray worker's assigned CPUs (a Ray Train worker's
    ``cpus_per_worker``), else the CPUs this process may run on."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            if ctx.worker.mode == ray.WORKER_MODE:
                cpus = ctx.get_assigned_resources().get("CPU")
                if cpus:
                    return max(1, int(round(cpus)))
    except Exception:  # pragma: no cover - no Ray, or an older runtime context
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _Done:
    def __init__(self, cols):
        self.cols = cols

    def result(self):
        return self.cols


class FrameDecoder:
    """Decodes the ``JPEG`` column of consumer-side blocks (see the module docstring).

    mode: "trainer" (thread pool, simplejpeg) or "gpu" (nvJPEG on ``device``, default "cuda";
        the batched ``torchvision.io.decode_jpeg`` path also runs with ``device="cpu"``, which
        the tests use where there is no GPU).
    threads: the pool's threads ("trainer"); None = ``default_threads()``.
    """

    def __init__(self, spec: SampleSpec, mode: str = "trainer", threads: int | None = None,
                 device: str | None = None):
        if mode not in ("trainer", "gpu"):
            raise ValueError(f"FrameDecoder mode must be 'trainer' or 'gpu', got {mode!r}")
        self.spec, self.mode = spec, mode
        self.threads = int(threads) if threads else default_threads()
        self.device = device or "cuda"
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ api
    def submit(self, cols: dict, shards: list[str]):
        """Start decoding one block (``shards[i]``: the shard name of row ``i``, for error
        messages); ``.result()`` of the returned handle is the block with ``FRAMES``."""
        if self.mode == "gpu":
            return _Done(self._gpu(cols, shards))
        n, s = len(cols[KEY]), self.spec
        frames = np.empty((n, s.segments, s.frame_size, s.frame_size, 3), np.uint8)
        rows = np.flatnonzero(np.asarray(cols[FRAMES_PENDING], dtype=bool))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="frame-decode")
        # one job per row: T frames each, enough work per job to amortise the pool's overhead
        futs = [(int(i), self._pool.submit(self._row, cols[JPEG][i], cols[JPEG_OFFSETS][i],
                                           frames[i])) for i in rows]
        return _Handle(self, cols, frames, futs, shards)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ cpu
    def _row(self, data, offsets, out: np.ndarray) -> MemberError | None:
        mv, size = memoryview(data), self.spec.frame_size
        for t in range(self.spec.segments):
            name = frame_member(t)
            try:
                decode_frame(mv[int(offsets[t]):int(offsets[t + 1])], name, out[t], size)
            except MemberError as e:
                return e
        return None

    # ------------------------------------------------------------------ gpu
    def _gpu(self, cols: dict, shards: list[str]) -> dict:
        import simplejpeg
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        s, n = self.spec, len(cols[KEY])
        T, S = s.segments, s.frame_size
        errors: dict[int, MemberError] = {}
        inputs: dict[int, list] = {}
        for i in np.flatnonzero(np.asarray(cols[FRAMES_PENDING], dtype=bool)):
            i = int(i)
            off = cols[JPEG_OFFSETS][i]
            whole = torch.from_numpy(np.frombuffer(cols[JPEG][i], np.uint8).copy())
            parts = []
            for t in range(T):
                part = whole[int(off[t]):int(off[t + 1])]
                try:  # the same header check as the CPU decode, before the GPU sees it
                    h, w, _, _ = simplejpeg.decode_jpeg_header(part.numpy())
                except Exception as e:
                    errors[i] = MemberError(frame_member(t), f"does not decode as JPEG "
                                            f"({type(e).__name__}: {e})")
                    break
                if (h, w) != (S, S):
                    errors[i] = MemberError(frame_member(t), f"frame is {w}x{h}, manifest "
                                            f"frame_size {S}")
                    break
                parts.append(part)
            else:
                inputs[i] = parts
        frames = torch.zeros((n, T, S, S, 3), dtype=torch.uint8, device=self.device)

        def put(rows: list[int], decoded: list) -> None:
            x = torch.stack(decoded).view(len(rows), T, 3, S, S).permute(0, 1, 3, 4, 2)
            frames[torch.as_tensor(rows, device=self.device)] = x

        rows = list(inputs)
        if rows:
            try:
                put(rows, decode_jpeg([p for i in rows for p in inputs[i]], mode=ImageReadMode.RGB,
                                      device=self.device))
            except RuntimeError:  # some frame failed: find it, frame by frame
                good = []
                for i in rows:
                    out = []
                    for t, p in enumerate(inputs[i]):
                        try:
                            out.append(decode_jpeg(p, mode=ImageReadMode.RGB, device=self.device))
                        except RuntimeError as e:
                            errors[i] = MemberError(frame_member(t), f"does not decode as JPEG "
                                                    f"(nvJPEG: {e})")
                            break
                    else:
                        good.append((i, out))
                for i, out in good:
                    put([i], out)
        return _merge(cols, frames, errors, shards)


class _Handle:
    def __init__(self, dec: FrameDecoder, cols, frames, futs, shards):
        self.dec, self.cols, self.frames, self.futs, self.shards = dec, cols, frames, futs, shards

    def result(self) -> dict:
        errors = {}
        decoded = np.zeros(len(self.frames), dtype=bool)
        for i, f in self.futs:
            e = f.result()
            if e is None:
                decoded[i] = True
            else:
                errors[i] = e
        self.frames[~decoded] = 0  # rows never decoded, or whose decode failed
        return _merge(self.cols, self.frames, errors, self.shards)


def _merge(cols: dict, frames, errors: dict[int, MemberError], shards: list[str]) -> dict:
    """The block as a decoding task would have yielded it: ``FRAMES`` in, the JPEG columns
    out, a frame error replacing the row's error (see the module docstring)."""
    out = {k: v for k, v in cols.items() if k not in (JPEG, JPEG_OFFSETS, FRAMES_PENDING)}
    ok = np.array(cols[OK], dtype=bool)  # a copy: Ray's arrays are read-only
    if errors:
        err = np.array(cols[ERROR], dtype=object)
        err_shard = np.array(cols[ERR_SHARD], dtype=object)
        err_member = np.array(cols[ERR_MEMBER], dtype=object)
        for i, e in errors.items():
            ok[i] = False
            err[i] = row_error(shards[i], str(cols[KEY][i]), e)
            err_shard[i], err_member[i] = shards[i], e.member or ""
        out.update({ERROR: err, ERR_SHARD: err_shard, ERR_MEMBER: err_member})
    if not ok.all() and isinstance(frames, np.ndarray):
        frames[~ok] = 0  # bad rows zero-filled, as the decode task leaves them
    elif not ok.all():
        import torch

        frames[torch.from_numpy(~ok).to(frames.device)] = 0
    out[FRAMES] = frames
    out[OK] = ok
    return out
