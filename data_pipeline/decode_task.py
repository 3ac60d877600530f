"""The Ray Data decode task of the streaming ingest (``data_pipeline.ingest``): fetch a task's
sample spans with ranged reads, check each against its manifest sha256, parse its tar members
and decode them into fixed-shape numpy columns (``data_pipeline.sample``), one block per plan
batch. A bad sample never raises here: its row is zero-filled and marked (``ok=False``, the
error naming shard, key and member) for the consumer to raise or skip.

With ``decode_frames=False`` (``IngestConfig.decode_on`` "trainer" / "gpu") the task does all
of that except decoding the JPEG frames: it ships each sample's frame members as bytes and the
consumer decodes them (``data_pipeline.frame_decode``) with the same checks (``decode_frame``)
and the same error messages (``row_error``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np
import simplejpeg

from data_pipeline import storage
from data_pipeline.datasets.base import Dataset
from data_pipeline.decode import decode_flac
from data_pipeline.errors import MemberError
from data_pipeline.sample import (AUDIO, ERR_MEMBER, ERR_SHARD, ERROR, FRAMES, FRAMES_PENDING,
                                  JPEG, JPEG_OFFSETS, KEY, OK, TARGET_PREFIX, LabelError,
                                  SampleSpec, empty_columns, npy_member)
from data_pipeline.schema import AUDIO_FLAC_MEMBER, AUDIO_NPY_MEMBER, LABELS_MEMBER, frame_member
from data_pipeline.tario import parse_members


def decode_frame(data, name: str, out: np.ndarray, size: int) -> None:
    """One JPEG frame member into ``out`` ((size, size, 3) uint8), or a ``MemberError`` naming
    it: the frame must be ``size`` x ``size`` (checked from the header, before decoding) and
    decode without libjpeg warnings (strict: corrupt data is an error, not grey)."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        if (h, w) != (size, size):
            raise MemberError(name, f"frame is {w}x{h}, manifest frame_size {size}")
        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True)
    except MemberError:
        raise
    except Exception as e:
        raise MemberError(name, f"does not decode as JPEG ({type(e).__name__}: {e})") from None


def row_error(shard: str, key: str, e: MemberError) -> str:
    """The message of a bad row (what ``IngestError`` says): shard, key, member, problem."""
    return f"{shard}: sample {key!r}" + (f" member {e.member!r}" if e.member else "") + \
        f": {e.problem}"


def check_span(data, sha: str) -> None:
    """A sample's span (its raw bytes) against its manifest sha256."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise MemberError(None, f"sha256 mismatch (manifest {sha[:12]}..., read {got[:12]}...)")


class SampleDecoder:
    """Decodes verified sample spans into preallocated fixed-shape columns."""

    def __init__(self, spec: SampleSpec, dataset: Dataset):
        self.spec, self.dataset = spec, dataset
        self.fill_targets = dataset.target_encoder(spec)

    def decode_into(self, buf: memoryview, key: str, cols: dict, i: int) -> None:
        """One verified sample into row ``i`` of ``cols``. Columns without ``FRAMES`` (see
        ``empty_columns(frames=False)``) get the frame members' bytes instead, and the row is
        marked ``FRAMES_PENDING`` once the frame stage is reached (before audio, extras and
        labels, the order in which a decoding task meets errors)."""
        s = self.spec
        members = parse_members(buf, key)  # a TarReadError is a MemberError
        labels = self.check_members(members)
        size = s.frame_size
        if FRAMES in cols:
            for t in range(s.segments):
                name = frame_member(t)
                decode_frame(members[name], name, cols[FRAMES][i, t], size)
        else:
            parts = [members[frame_member(t)] for t in range(s.segments)]
            cols[JPEG][i] = b"".join(parts)
            np.cumsum([len(p) for p in parts], out=cols[JPEG_OFFSETS][i, 1:])
            cols[FRAMES_PENDING][i] = True
        if s.audio_format == "flac":
            wave = self._flac(members[AUDIO_FLAC_MEMBER], s.audio_len)
            aname = AUDIO_FLAC_MEMBER
        else:
            aname = AUDIO_NPY_MEMBER
            wave = npy_member(members[aname], aname)
        if wave.dtype != np.int16 or wave.shape != (s.audio_len,):
            raise MemberError(aname, f"expected int16 ({s.audio_len},), got {wave.dtype} "
                              f"{tuple(wave.shape)}")
        cols[AUDIO][i] = wave
        targets = {k[len(TARGET_PREFIX):]: v for k, v in cols.items()
                   if k.startswith(TARGET_PREFIX)}
        self.dataset.decode_extra(members, labels, s, targets, i)
        try:
            self.fill_targets(labels, targets, i)
        except LabelError as e:
            raise MemberError(LABELS_MEMBER, str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise MemberError(LABELS_MEMBER, f"labels do not fit the schema ({e!r})") from None

    def check_members(self, members: dict) -> dict:
        """The labels of a parsed sample, after checking its member names against the schema."""
        s = self.spec
        try:
            labels = json.loads(bytes(members[LABELS_MEMBER]))
        except KeyError:
            raise MemberError(LABELS_MEMBER, "missing member") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise MemberError(LABELS_MEMBER, f"not valid JSON ({e})") from None
        if not isinstance(labels, dict):
            raise MemberError(LABELS_MEMBER, f"labels must be a JSON object, got "
                              f"{type(labels).__name__}")
        try:
            want = self.dataset.members(labels, s.audio_format)
        except (KeyError, ValueError, TypeError) as e:
            raise MemberError(LABELS_MEMBER, f"labels do not say which members to expect "
                              f"({e!r})") from None
        missing = sorted(set(want) - set(members))
        if missing:
            raise MemberError(missing[0], f"missing member(s) {missing}")
        extra = sorted(set(members) - set(want))
        if extra:
            raise MemberError(extra[0], f"unexpected member(s) {extra}")
        return labels

    @staticmethod
    def _flac(data: memoryview, samples: int) -> np.ndarray:
        try:
            return decode_flac(bytes(data), max_samples=samples)
        except Exception as e:
            raise MemberError(AUDIO_FLAC_MEMBER, f"does not decode as FLAC "
                              f"({type(e).__name__}: {e})") from None


def _fetch(fs, base: str, items: list[list], max_gap: int) -> dict[int, memoryview | MemberError]:
    """Raw bytes of each item (``[row, shard, key, offset, length, sha]``), keyed by row.

    Spans of one shard are sorted and merged when the gap between them is at most
    ``max_gap`` bytes, then all requests go out together (``cat_ranges`` runs them
    concurrently on object stores). Missing shards, short reads (truncation) and, on local
    disk, a directory or FIFO in place of a shard (checked first: never opened) mark the
    affected samples bad; other I/O errors propagate (Ray retries the task)."""
    out: dict[int, memoryview | MemberError] = {}
    runs: list[tuple[str, int, int, list]] = []  # (path, start, end, items)
    local = storage.is_local_fs(fs)
    not_files: dict[str, str | None] = {}
    for it in sorted(items, key=lambda x: (x[1], x[3])):
        path = storage.join(base, it[1])
        if local:  # a FIFO in place of a shard would block the read forever
            if path not in not_files:
                not_files[path] = storage.not_a_regular_file(path)
            if not_files[path]:
                out[it[0]] = MemberError(None, f"shard {not_files[path]}")
                continue
        start, end = it[3], it[3] + it[4]
        if runs and runs[-1][0] == path and start - runs[-1][2] <= max_gap:
            p, s0, e0, its = runs[-1]
            runs[-1] = (p, s0, max(e0, end), its + [it])
        else:
            runs.append((path, start, end, [it]))
    if not runs:
        return out
    try:
        datas = fs.cat_ranges([r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs],
                              on_error="return")
    except FileNotFoundError:  # some filesystems raise instead of returning per path
        datas = []
        for r in runs:
            try:
                datas.append(fs.cat_file(r[0], start=r[1], end=r[2]))
            except Exception as e:
                datas.append(e)
    for (path, s0, e0, its), data in zip(runs, datas):
        if isinstance(data, BaseException):
            if isinstance(data, FileNotFoundError):
                problem = "shard listed in the manifest is missing"
            elif isinstance(data, (IsADirectoryError, NotADirectoryError, PermissionError)):
                problem = f"shard cannot be read ({type(data).__name__}: {data})"
            elif (size := _size_or_none(fs, path)) is not None and size <= s0:
                # a request that starts past the end of a truncated object: object stores
                # answer 416 (InvalidRange), not a short read
                for it in its:
                    out[it[0]] = MemberError(None, f"shard truncated: sample span [{it[3]}, "
                                             f"{it[3] + it[4]}) ends after the file "
                                             f"({size} bytes)")
                continue
            else:
                raise data  # transient I/O: Ray retries the task
            for it in its:
                out[it[0]] = MemberError(None, problem)
            continue
        mv = memoryview(data)
        for it in its:
            lo = it[3] - s0
            chunk = mv[lo:lo + it[4]]
            if len(chunk) < it[4]:
                out[it[0]] = MemberError(None, f"shard truncated: sample span [{it[3]}, "
                                         f"{it[3] + it[4]}) ends after the file "
                                         f"({s0 + len(mv)} bytes)")
            else:
                out[it[0]] = chunk
    return out


def _size_or_none(fs, path: str) -> int | None:
    try:
        return int(fs.size(path))
    except Exception:
        return None


def decode_task(batch: dict, base: str, spec: dict, storage_options: dict, max_gap: int,
                dataset: Dataset, decode_frames: bool = True) -> Iterator[dict]:
    """Ray Data UDF: one row per task, ``batch["spec"]`` = JSON ``{"batches": [[item, ...],
    ...]}``; ``spec`` the split's ``SampleSpec.to_dict()``; ``dataset`` the ``Dataset``
    object itself (resolved on the driver: a plug-in dataset need not be registered in the
    worker). Yields one block per plan batch (rows in plan order, bad rows zero-filled,
    ok=False). ``decode_frames=False``: JPEG frames shipped as bytes (see the module
    docstring)."""
    sspec = SampleSpec(**spec)
    decoder = SampleDecoder(sspec, dataset)
    fs, path = storage.filesystem(base, **storage_options)
    for task_json in batch["spec"]:
        task = json.loads(task_json)
        flat = [it for b in task["batches"] for it in b]
        raw = _fetch(fs, path, flat, max_gap)
        row = 0
        for b in task["batches"]:
            n = len(b)
            cols = empty_columns(sspec, n, dataset, frames=decode_frames)
            if not decode_frames:
                cols[JPEG] = np.full(n, b"", dtype=object)
            keys = np.empty(n, dtype=object)
            err = np.full(n, "", dtype=object)
            err_shard = np.full(n, "", dtype=object)
            err_member = np.full(n, "", dtype=object)
            for i, it in enumerate(b):
                _, shard, key, _, _, sha = it
                keys[i] = key
                data = raw[row + i]
                try:
                    if isinstance(data, MemberError):
                        raise data
                    check_span(data, sha)
                    decoder.decode_into(data, key, cols, i)
                    cols[OK][i] = True
                except MemberError as e:
                    _zero_row(cols, i)  # (a FRAMES_PENDING row keeps its flag and bytes)
                    err[i] = row_error(shard, key, e)
                    err_shard[i], err_member[i] = shard, e.member or ""
            row += n
            cols.update({KEY: keys, ERROR: err, ERR_SHARD: err_shard, ERR_MEMBER: err_member})
            yield cols
        del raw


def warm_up(base: str, storage_options: dict) -> None:
    """A Ray task run when a ``ShardStream`` is made: imports what a decode task needs (Ray
    Data's map-task machinery, this module, the filesystem) in a worker process, which the
    epoch's first decode tasks then reuse. Never raises."""
    try:
        import ray.data  # noqa: F401

        storage.filesystem(base, **storage_options)
    except Exception:  # pragma: no cover - best effort
        pass


def _zero_row(cols: dict, i: int) -> None:
    """Zero-fill a bad row; a row that reached the frame stage keeps its JPEG bytes and
    offsets: the consumer decodes them first, as a decoding task would have, so that a bad
    frame is reported before a later member's error."""
    for k, v in cols.items():
        if k in (JPEG_OFFSETS, FRAMES_PENDING):
            continue
        if isinstance(v, np.ndarray) and v.dtype != object:
            v[i] = 0
