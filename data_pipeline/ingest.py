"""Streaming ingest: WebDataset shards at any fsspec URL -> Ray Data decode tasks -> ``AVBatch``
on each training worker.

Two entry points:

``ShardStream`` (what the trainer uses)
    Per rank, per epoch, a deterministic plan (``data_pipeline.plan``: shard order seeded by
    (seed, epoch), then a window shuffle of ``shuffle_buffer`` positions, dealt to ranks one
    global batch at a time) is cut into *tasks* of about one window's share each. Every task is
    one Ray Data CPU task that
      1. fetches the raw bytes of its samples with ranged reads (the manifest's byte spans,
         adjacent spans merged into one request, requests issued concurrently through
         ``fs.cat_ranges``) -- this is the bounded buffer of **raw, undecoded** samples, at most
         ~``shuffle_buffer / world_size`` of them per task;
      2. checks each sample's sha256 against the manifest, parses its tar members, checks them
         against the schema;
      3. decodes JPEG frames (simplejpeg / libjpeg-turbo, straight into the output array),
         int16 audio, masks, features and labels into fixed-shape numpy columns, and yields one
         block per plan batch.
    The worker iterates the blocks in plan order (``preserve_order``) with
    ``prefetch_batches`` of lookahead and wraps each batch into an ``AVBatch`` (uint8 frames,
    int16 audio: resize / normalise / mel happen on the training device).

    Why not ``ray.data.read_webdataset`` + ``streaming_split`` for training: neither gives an
    exact mid-epoch resume (Ray's iterators are not resumable, ray-project/ray #37633), the
    split does not give every rank the same, deterministic sample sequence, and whole-shard
    reads cannot check a sample against its manifest sha256 before decoding it. Planned ranged
    reads give all three, and skip the consumed prefix of an epoch without reading it.

``read_split`` (the plain Ray Data path)
    ``ray.data.read_webdataset`` over the manifest's shard list (no listing), decoded with the
    pickle-free ``decode_member``; usable with ``Dataset.streaming_split`` for ad-hoc jobs
    (evaluation, statistics, inspection).

Bad data. A truncated shard, a missing shard, a sha256 mismatch, a malformed tar header, a
missing or unexpected member, a corrupt JPEG / PNG / npy, a labels field that does not fit the
manifest: the decode task never raises for these, it marks the sample's row bad (zero-filled,
``ok=False``) with a message naming the shard, key and member. The consumer then raises
``IngestError`` with that message when it reaches the sample (``on_error="raise"``, default), or
drops the row and counts it (``on_error="skip"``). Rows stay aligned with the plan, so batch
``j`` always covers plan positions ``[j*B, (j+1)*B)`` of the rank: a skipped sample makes its
batch shorter (``meta["skipped"]``), never shifts later batches, and resume stays exact. A bad
sample is never replaced by another one and never delivered.

Memory. Nothing materialises the split: tasks are created per epoch from the plan, at most
``read_concurrency`` (default: as many as the Ray Data executor schedules) run at once, each
holds one window share raw plus one decoded batch, Ray Data's object-store budget
(``object_store_budget``) applies backpressure, and the consumer holds ``prefetch_batches``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import simplejpeg

from data_pipeline import storage
from data_pipeline.collate import (
    AUDIO, ERR_MEMBER, ERR_SHARD, ERROR, FRAMES, KEY, OK, TARGET_PREFIX, LabelError, SampleSpec,
    TargetEncoder, empty_columns, to_avbatch)
from data_pipeline import verify
from data_pipeline.decode import decode_flac, decode_npy, decode_png_mask
from data_pipeline.errors import DataPipelineError, ShardError
from data_pipeline.plan import SplitIndex, epoch_order, num_full_batches, rank_plan
from data_pipeline.schema import (
    AUDIO_FLAC_MEMBER, AUDIO_NPY_MEMBER, FEATURES_MEMBER, FORBIDDEN_SUFFIXES, LABELS_MEMBER,
    expected_members, frame_member, manifest_name, mask_member)

log = logging.getLogger("data_pipeline.ingest")

STATE_VERSION = 1


class IngestError(DataPipelineError):
    """A sample (or the split) cannot be read as its manifest describes."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None,
                 member: str | None = None):
        self.shard, self.key, self.member = shard, key, member
        super().__init__(message)

    def __reduce__(self):
        return (IngestError, (str(self), self.shard, self.key, self.member))


@dataclass
class IngestConfig:
    """Configuration of one split's stream (Contract 1).

    url: directory holding ``{split}-NNNNNN.tar`` and ``{split}.manifest.json`` (local path,
        ``file://``, ``s3://`` with the endpoint from ``AWS_ENDPOINT_URL``, ``gs://``, ...).
    batch_size: samples per batch on each rank.
    shuffle: False = manifest order, no shuffle (evaluation).
    shuffle_buffer: positions per window of the global window shuffle; each rank holds its
        ~1/world_size share of a window raw (undecoded) in one decode task.
    read_concurrency: at most this many decode tasks at once per rank (None: Ray Data decides).
    prefetch_batches: batches decoded ahead of the consumer.
    on_error: "raise" (IngestError naming shard, key, member) or "skip" (drop and count).
    decode_resources: Ray resources of one decode task, e.g. ``{"CPU": 1, "ingest": 1}`` to pin
        decoding to a CPU-only node type, or ``{"CPU": 0.5}`` when training workers hold most
        CPUs of a small machine. None = ``{"CPU": 1}``.
    drop_last: True (training): every rank gets the same number of full batches and the
        < batch_size*world_size leftover samples of the epoch are not read (the permutation
        changes them every epoch). False (evaluation): every sample once; the last global
        batch is dealt in batch_size chunks, so some ranks get a short or one fewer batch.
    object_store_budget: bytes of Ray object store the epoch's execution may use (Ray Data
        backpressure); None = Ray Data's default share.
    storage_options: fsspec options that override the environment (endpoint, credentials).
    """

    url: str
    split: str = "train"
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256
    read_concurrency: int | None = None
    prefetch_batches: int = 2
    on_error: str = "raise"
    decode_resources: dict | None = None
    drop_last: bool = True
    object_store_budget: int | None = None
    storage_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise IngestError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        for name in ("batch_size", "shuffle_buffer", "prefetch_batches"):
            if int(getattr(self, name)) < (0 if name == "prefetch_batches" else 1):
                raise IngestError(f"IngestConfig.{name} must be positive, got "
                                  f"{getattr(self, name)!r}")
        if self.read_concurrency is not None and self.read_concurrency < 1:
            raise IngestError(f"read_concurrency must be >= 1 or None, got {self.read_concurrency}")


# ============================================================================== manifest
def load_manifest(url: str, split: str, storage_options: dict | None = None) -> dict:
    murl = storage.join(storage.filesystem(url, **(storage_options or {}))[1], manifest_name(split))
    try:
        manifest = verify.load_manifest(url, split, storage_options)
    except ShardError as e:
        raise IngestError(str(e), shard=murl) from None
    for fld in ("dataset", "split", "segments", "options", "shards", "num_samples"):
        if fld not in manifest:
            raise IngestError(f"{murl}: manifest has no {fld!r} field", shard=murl)
    for s in manifest["shards"]:
        if "spans" not in s or "sample_sha256" not in s:
            raise IngestError(f"{murl}: shard {s.get('name')!r} has no per-sample 'spans' / "
                              "'sample_sha256' (re-pack with this avmoe)", shard=murl)
    return manifest


def worker_env(url: str) -> dict | None:
    """A runtime_env forwarding the driver's S3 settings to decode tasks: Ray workers started
    before the variables were set (a long-lived local Ray, tests) would not see them.
    On a cluster whose nodes have their own credentials the driver has none and this is None."""
    if not url.startswith(("s3://", "s3a://")):
        return None
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    env = {k: os.environ[k] for k in names if k in os.environ}
    return {"env_vars": env} if env else None


# ============================================================================== decode task
_ZERO_BLOCK = bytes(512)
_SPECIAL_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                  tarfile.GNUTYPE_LONGLINK, tarfile.SOLARIS_XHDTYPE)


class _Bad(Exception):
    """One sample is bad: (member, problem); the shard and key are added by the caller."""

    def __init__(self, member: str | None, problem: str):
        self.member, self.problem = member, problem
        super().__init__(problem)


def parse_members(buf: memoryview, key: str) -> dict[str, memoryview]:
    """Members ``{suffix: bytes}`` of one sample span (zero-copy views). The packer writes
    plain ustar headers; anything else (pax/GNU extension headers) is parsed by ``tarfile``."""
    members: dict[str, memoryview] = {}
    pos, n = 0, len(buf)
    while pos < n:
        hdr = bytes(buf[pos:pos + 512])
        if len(hdr) < 512:
            raise _Bad(None, f"span ends inside a tar header at byte {pos}")
        if hdr == _ZERO_BLOCK:
            raise _Bad(None, f"end-of-archive block inside the sample span at byte {pos}")
        name, size, kind = _ustar_header(hdr, pos)
        if kind in _SPECIAL_TYPES or size < 0:
            return _parse_with_tarfile(buf, key)
        data = buf[pos + 512:pos + 512 + size]
        if len(data) < size:
            raise _Bad(name, f"member data truncated ({len(data)} of {size} bytes)")
        pos += 512 + -(-size // 512) * 512
        if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
            _add_member(members, name, data, key)
    return members


def _ustar_header(hdr: bytes, pos: int) -> tuple[str, int, bytes]:
    """(name, size, type) of a ustar header, checksum verified. ~5x cheaper than
    ``TarInfo.frombuf``, which parses every field; size -1 = a base-256 size (let tarfile do
    it)."""
    try:
        chksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Bad(None, f"malformed tar header at byte {pos} of the span (checksum field "
                   f"{hdr[148:156]!r})") from None
    if chksum != 256 + sum(hdr[:148]) + sum(hdr[156:]):
        raise _Bad(None, f"malformed tar header at byte {pos} of the span (bad checksum)")
    raw_size = hdr[124:136]
    if raw_size[0] & 0x80:
        return "", -1, hdr[156:157]
    try:
        size = int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Bad(None, f"malformed tar header at byte {pos} of the span (size field "
                   f"{raw_size!r})") from None
    name = hdr[:100].split(b"\0", 1)[0]
    prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, hdr[156:157]


def _parse_with_tarfile(buf: memoryview, key: str) -> dict[str, memoryview]:
    members: dict[str, memoryview] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    _add_member(members, info.name, memoryview(tar.extractfile(info).read()), key)
    except tarfile.TarError as e:
        raise _Bad(None, f"malformed tar ({e})") from None
    return members


def _add_member(members: dict, name: str, data: memoryview, key: str) -> None:
    base = name.rsplit("/", 1)[-1]
    k, _, suffix = base.partition(".")
    if k != key or not suffix:
        raise _Bad(name, f"member {name!r} in the span of key {key!r} (keys must be "
                   "contiguous; the manifest span does not match the tar)")
    if suffix.rsplit(".", 1)[-1] in FORBIDDEN_SUFFIXES:
        raise _Bad(suffix, "pickle members are not allowed in avmoe shards")
    if suffix in members:
        raise _Bad(suffix, "member appears twice")
    members[suffix] = data


class SampleDecoder:
    """Decodes verified sample spans into preallocated fixed-shape columns."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec
        self.targets = TargetEncoder(spec)

    def decode_into(self, buf: memoryview, key: str, cols: dict, i: int) -> None:
        s = self.spec
        members = parse_members(buf, key)
        try:
            labels = json.loads(bytes(members[LABELS_MEMBER]))
        except KeyError:
            raise _Bad(LABELS_MEMBER, "missing member") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise _Bad(LABELS_MEMBER, f"not valid JSON ({e})") from None
        try:
            want = expected_members(s.dataset, labels, s.audio_format)
        except (KeyError, ValueError, TypeError) as e:
            raise _Bad(LABELS_MEMBER, f"labels do not say which members to expect ({e!r})") \
                from None
        missing = sorted(set(want) - set(members))
        if missing:
            raise _Bad(missing[0], f"missing member(s) {missing}")
        extra = sorted(set(members) - set(want))
        if extra:
            raise _Bad(extra[0], f"unexpected member(s) {extra}")
        size = s.frame_size
        for t in range(s.segments):
            name = frame_member(t)
            self._jpeg(members[name], name, cols[FRAMES][i, t], size)
        if s.audio_format == "flac":
            wave = self._flac(members[AUDIO_FLAC_MEMBER])
            aname = AUDIO_FLAC_MEMBER
        else:
            aname = AUDIO_NPY_MEMBER
            wave = self._npy(members[aname], aname)
        if wave.dtype != np.int16 or wave.shape != (s.audio_len,):
            raise _Bad(aname, f"expected int16 ({s.audio_len},), got {wave.dtype} "
                       f"{tuple(wave.shape)}")
        cols[AUDIO][i] = wave
        if s.dataset == "avvp":
            feats = self._npy(members[FEATURES_MEMBER], FEATURES_MEMBER)
            if feats.shape != (s.segments, 512) or feats.dtype != np.float32:
                raise _Bad(FEATURES_MEMBER, f"expected float32 ({s.segments}, 512), got "
                           f"{feats.dtype} {tuple(feats.shape)}")
            cols[TARGET_PREFIX + "features"][i] = feats
        if s.dataset.startswith("avs"):
            masks = cols[TARGET_PREFIX + "masks"][i]
            masks[:] = 0
            for t in range(int(labels.get("num_masks", 0))):
                name = mask_member(t)
                try:
                    m = decode_png_mask(bytes(members[name]))
                except Exception as e:
                    raise _Bad(name, f"does not decode as PNG ({type(e).__name__}: {e})") from None
                if m.shape != (s.mask_size, s.mask_size):
                    raise _Bad(name, f"mask is {m.shape}, manifest mask_size {s.mask_size}")
                masks[t] = m
        try:
            self.targets.fill(labels, {k[len(TARGET_PREFIX):]: v for k, v in cols.items()
                                       if k.startswith(TARGET_PREFIX)}, i)
        except LabelError as e:
            raise _Bad(LABELS_MEMBER, str(e)) from None
        except (TypeError, ValueError) as e:
            raise _Bad(LABELS_MEMBER, f"labels do not fit the schema ({e})") from None

    def _jpeg(self, data: memoryview, name: str, out: np.ndarray, size: int) -> None:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            if (h, w) != (size, size):
                raise _Bad(name, f"frame is {w}x{h}, manifest frame_size {size}")
            # strict: libjpeg's recoverable warnings (corrupt data) are errors, not grey
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True)
        except _Bad:
            raise
        except Exception as e:
            raise _Bad(name, f"does not decode as JPEG ({type(e).__name__}: {e})") from None

    @staticmethod
    def _npy(data: memoryview, name: str) -> np.ndarray:
        try:
            return decode_npy(data)
        except Exception as e:
            raise _Bad(name, f"does not load as .npy ({type(e).__name__}: {e})") from None

    @staticmethod
    def _flac(data: memoryview) -> np.ndarray:
        try:
            return decode_flac(data)
        except Exception as e:
            raise _Bad(AUDIO_FLAC_MEMBER, f"does not decode as FLAC ({type(e).__name__}: {e})") \
                from None


def _fetch(fs, base: str, items: list[list], max_gap: int) -> dict[int, memoryview | _Bad]:
    """Raw bytes of each item (``[row, shard, key, offset, length, sha]``), keyed by row.

    Spans of one shard are sorted and merged when the gap between them is at most
    ``max_gap`` bytes, then all requests go out together (``cat_ranges`` runs them
    concurrently on object stores). Missing shards and short reads (truncation) mark the
    affected samples bad; other I/O errors propagate (Ray retries the task)."""
    out: dict[int, memoryview | _Bad] = {}
    runs: list[tuple[str, int, int, list]] = []  # (path, start, end, items)
    for it in sorted(items, key=lambda x: (x[1], x[3])):
        path = storage.join(base, it[1])
        start, end = it[3], it[3] + it[4]
        if runs and runs[-1][0] == path and start - runs[-1][2] <= max_gap:
            p, s0, e0, its = runs[-1]
            runs[-1] = (p, s0, max(e0, end), its + [it])
        else:
            runs.append((path, start, end, [it]))
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
                for it in its:
                    out[it[0]] = _Bad(None, "shard listed in the manifest is missing")
                continue
            raise data
        mv = memoryview(data)
        for it in its:
            lo = it[3] - s0
            chunk = mv[lo:lo + it[4]]
            if len(chunk) < it[4]:
                out[it[0]] = _Bad(None, f"shard truncated: sample span [{it[3]}, "
                                  f"{it[3] + it[4]}) ends after the file ({s0 + len(mv)} bytes)")
            else:
                out[it[0]] = chunk
    return out


def decode_task(batch: dict, base: str, spec: dict, storage_options: dict,
                max_gap: int) -> Iterator[dict]:
    """Ray Data UDF: one row per task, ``spec`` = JSON ``{"batches": [[item, ...], ...]}``;
    yields one block per plan batch (rows in plan order, bad rows zero-filled, ok=False)."""
    sspec = SampleSpec(**spec)
    decoder = SampleDecoder(sspec)
    fs, path = storage.filesystem(base, **storage_options)
    for task_json in batch["spec"]:
        task = json.loads(task_json)
        flat = [it for b in task["batches"] for it in b]
        raw = _fetch(fs, path, flat, max_gap)
        row = 0
        for b in task["batches"]:
            n = len(b)
            cols = empty_columns(sspec, n)
            keys = np.empty(n, dtype=object)
            err = np.full(n, "", dtype=object)
            err_shard = np.full(n, "", dtype=object)
            err_member = np.full(n, "", dtype=object)
            for i, it in enumerate(b):
                _, shard, key, _, _, sha = it
                keys[i] = key
                data = raw[row + i]
                try:
                    if isinstance(data, _Bad):
                        raise data
                    if hashlib.sha256(data).hexdigest() != sha:
                        raise _Bad(None, f"sha256 mismatch (manifest {sha[:12]}..., read "
                                   f"{hashlib.sha256(data).hexdigest()[:12]}...)")
                    decoder.decode_into(data, key, cols, i)
                    cols[OK][i] = True
                except _Bad as e:
                    _zero_row(cols, i)
                    err[i] = f"{shard}: sample {key!r}" + (f" member {e.member!r}" if e.member
                                                           else "") + f": {e.problem}"
                    err_shard[i], err_member[i] = shard, e.member or ""
            row += n
            cols.update({KEY: keys, ERROR: err, ERR_SHARD: err_shard, ERR_MEMBER: err_member})
            yield cols
        del raw


def _zero_row(cols: dict, i: int) -> None:
    for k, v in cols.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            v[i] = 0


# ============================================================================== the stream
class ShardStream:
    """One rank's stream of a split (Contract 1); see the module docstring."""

    def __init__(self, cfg: IngestConfig, rank: int = 0, world_size: int = 1):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise IngestError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = load_manifest(cfg.url, cfg.split, cfg.storage_options)
        self.task = self.manifest["dataset"]
        self.index = SplitIndex(self.manifest)
        self.num_samples = self.index.num_samples
        if self.num_samples != int(self.manifest["num_samples"]):
            raise IngestError(f"{cfg.url} {cfg.split}: shards list {self.num_samples} samples, "
                              f"manifest num_samples {self.manifest['num_samples']}")
        self.spec = SampleSpec.from_manifest(self.manifest)
        self.skipped_total = 0
        self._origin: dict[int, tuple[int, int]] = {}  # epoch -> (start position, first index)
        self._orders: dict[int, np.ndarray] = {}
        if cfg.drop_last and self.batches_per_epoch == 0:
            raise IngestError(f"{cfg.url} {cfg.split}: {self.num_samples} samples give no full "
                              f"batch of {cfg.batch_size} on each of {world_size} ranks")

    # ---------------------------------------------------------------- plan
    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank (identical on every rank with drop_last)."""
        full = num_full_batches(self.num_samples, 0, self.cfg.batch_size, self.world_size)
        if self.cfg.drop_last:
            return full
        rest = self.num_samples - full * self.cfg.batch_size * self.world_size
        return full + (1 if rest > self.rank * self.cfg.batch_size else 0)

    def order(self, epoch: int) -> np.ndarray:
        """Flat sample ids of the epoch's global order (independent of world and batch size)."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.index, self.cfg.seed, epoch, self.cfg.shuffle,
                                               self.cfg.shuffle_buffer)}
        return self._orders[epoch]

    def plan_keys(self, epoch: int, start_batch: int = 0, start_sample: int | None = None):
        """The keys this rank will yield, batch by batch (no I/O): for tests and tooling."""
        plan = self._plan(epoch, start_batch, start_sample)
        return [[self.index.keys[f] for f in b] for b in plan.batches]

    def _plan(self, epoch: int, start_batch: int, start_sample: int | None):
        gb = self.cfg.batch_size * self.world_size
        start = start_batch * gb if start_sample is None else int(start_sample)
        if start > self.num_samples:
            raise IngestError(f"resume position {start} is past the end of epoch {epoch} "
                              f"({self.num_samples} samples)")
        return rank_plan(self.order(epoch), self.cfg.batch_size, self.world_size, self.rank,
                         start, self.cfg.drop_last)

    # ---------------------------------------------------------------- iteration
    def epoch(self, epoch: int, start_batch: int = 0, *,
              start_sample: int | None = None) -> Iterator:
        """``AVBatch``es of this rank for ``epoch``, from batch ``start_batch`` (exact resume:
        the batches a run that consumed ``start_batch`` batches did not see, in the same
        order). ``start_sample`` instead starts at a global position of the epoch order (a
        resume after a world-size or batch-size change, see ``resume``); batches are then
        numbered from 0."""
        plan = self._plan(epoch, start_batch, start_sample)
        first = start_batch if start_sample is None else 0
        self._origin[epoch] = (plan.start, first)
        return self._iterate(epoch, plan, first)

    def resume(self, state: dict) -> Iterator:
        """Continue the epoch recorded in ``state`` (from ``state()``, e.g. in a checkpoint).

        Same world size and batch size: exactly ``epoch(e, start_batch=k)``. Different world
        size or batch size: the epoch's global order does not depend on either, and the state's
        ``position`` says which prefix of it every rank together consumed, so the remaining
        suffix is re-dealt to the new ranks -- still no sample repeated or lost within the
        epoch; only the per-rank order differs from an unchanged run. The seed, shuffle
        settings and manifest must be the same (else IngestError)."""
        self._check_state(state)
        self.skipped_total = int(state.get("skipped_total", 0))
        e = int(state["epoch"])
        if (state["world_size"] == self.world_size and state["batch_size"] == self.cfg.batch_size
                and state["position"] == state["batches_consumed"] * self.cfg.batch_size
                * self.world_size):
            return self.epoch(e, start_batch=int(state["batches_consumed"]))
        log.warning("resuming epoch %d at global position %d with world_size %d, batch_size %d "
                    "(checkpoint: %d, %d): the remaining samples are re-dealt", e,
                    state["position"], self.world_size, self.cfg.batch_size,
                    state["world_size"], state["batch_size"])
        return self.epoch(e, start_sample=int(state["position"]))

    def _check_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise IngestError(f"ingest state version {state.get('version')!r}, this avmoe "
                              f"writes {STATE_VERSION}")
        mine = {"seed": self.cfg.seed, "shuffle": self.cfg.shuffle,
                "shuffle_buffer": self.cfg.shuffle_buffer, "num_samples": self.num_samples,
                "fingerprint": self.manifest.get("fingerprint")}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise IngestError("cannot resume: the checkpoint's ingest state differs in "
                              + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})"
                                          for k, (a, b) in diff.items()))

    def state(self, epoch: int, batches_consumed: int) -> dict:
        """JSON-able ingest state after this rank consumed batches up to index
        ``batches_consumed - 1`` of ``epoch`` (the ``meta["batch_index"]`` numbering; with
        ``epoch(e, start_batch=k)`` that is k, k+1, ...). ``position`` is the global
        samples of the epoch order consumed once every rank got as far."""
        start, first = self._origin.get(epoch, (0, 0))
        gb = self.cfg.batch_size * self.world_size
        position = min(self.num_samples, start + (int(batches_consumed) - first) * gb)
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "epoch": int(epoch),
                "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.cfg.batch_size, "batches_consumed": int(batches_consumed),
                "samples_consumed": int(batches_consumed) * self.cfg.batch_size,
                "position": int(position), "skipped_total": int(self.skipped_total),
                "shuffle": self.cfg.shuffle, "shuffle_buffer": self.cfg.shuffle_buffer,
                "num_samples": self.num_samples,
                "fingerprint": self.manifest.get("fingerprint")}

    # ---------------------------------------------------------------- ray
    def _tasks(self, plan) -> list[str]:
        """Group plan batches into decode tasks of about one window share each."""
        per_task = max(1, self.cfg.shuffle_buffer // (self.cfg.batch_size * self.world_size))
        tasks, row = [], 0
        for lo in range(0, len(plan.batches), per_task):
            group = []
            for b in plan.batches[lo:lo + per_task]:
                items = []
                for f in b:
                    shard, key, off, length, sha = self.index.item(int(f))
                    items.append([row, self.index.shard_names[shard], key, off, length, sha])
                    row += 1
                group.append(items)
            tasks.append(json.dumps({"batches": group}))
            row = 0
        return tasks

    def dataset(self, epoch: int, start_batch: int = 0, start_sample: int | None = None):
        """The Ray Dataset of this rank's epoch (lazy; one block per plan batch)."""
        return self._dataset(self._plan(epoch, start_batch, start_sample))

    def _dataset(self, plan):
        import ray
        if not ray.is_initialized():
            raise IngestError("ShardStream needs Ray: call avmoe.ray_env.init_local_ray() (or run "
                              "inside a Ray Train worker)")
        tasks = self._tasks(plan)
        ds = ray.data.from_items([{"spec": t} for t in tasks],
                                 override_num_blocks=max(1, len(tasks)))
        res = dict(self.cfg.decode_resources or {"CPU": 1})
        remote: dict = {"num_cpus": res.pop("CPU", 1)}
        if res.get("GPU"):
            remote["num_gpus"] = res.pop("GPU")
        if res:
            remote["resources"] = res
        env = worker_env(self.cfg.url)
        if env:
            remote["runtime_env"] = env
        local = storage.is_local(self.cfg.url)
        ds = ds.map_batches(
            decode_task, batch_size=1, batch_format="numpy", zero_copy_batch=True,
            concurrency=self.cfg.read_concurrency,
            fn_kwargs={"base": self.cfg.url, "spec": self.spec.to_dict(),
                       "storage_options": dict(self.cfg.storage_options),
                       # one request per run of nearby samples; on local disk only adjacent
                       "max_gap": 0 if local else 1 << 20},
            **remote)
        # The dataset's own context (a copy taken at creation): the process-wide one, which
        # the trainer's other datasets use, is left alone.
        ctx = ds.context
        ctx.execution_options.preserve_order = True  # plan order is the contract
        if self.cfg.object_store_budget is not None:
            ctx.execution_options.resource_limits = \
                ctx.execution_options.resource_limits.copy(
                    object_store_memory=int(self.cfg.object_store_budget))
        # One block per plan batch: Ray Data otherwise coalesces a task's yields into blocks of
        # up to 128 MiB (its default target_max_block_size), so prefetch_batches would count
        # 128 MiB blocks, not batches, and the consumer's memory would follow the frame size
        # times shuffle_buffer. The threshold is the fixed-size columns of one batch; the key
        # and error columns push every full batch over it, so each yield is emitted as is.
        ctx.target_max_block_size = max(1, sum(
            v.nbytes for v in empty_columns(self.spec, self.cfg.batch_size).values()))
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        return ds

    def _iterate(self, epoch: int, plan, first: int):
        if not plan.batches:
            return
        ds = self._dataset(plan)
        it = ds.iter_batches(batch_size=None, batch_format="numpy",
                             prefetch_batches=self.cfg.prefetch_batches)
        pending = None  # blocks are one plan batch each; re-cut defensively if Ray split them
        j = 0
        for cols in it:
            pending = cols if pending is None else {k: np.concatenate([pending[k], cols[k]])
                                                    for k in cols}
            while pending is not None and j < len(plan.batches) and \
                    len(pending[KEY]) >= len(plan.batches[j]):
                n = len(plan.batches[j])
                if len(pending[KEY]) == n:
                    cur, pending = pending, None
                else:
                    cur = {k: v[:n] for k, v in pending.items()}
                    pending = {k: v[n:] for k, v in pending.items()}
                yield self._collate(cur, epoch, plan, first + j, j)
                j += 1
        if j != len(plan.batches) or pending is not None:
            raise IngestError(f"ingest of epoch {epoch} rank {self.rank} ended after {j} of "
                              f"{len(plan.batches)} batches (Ray Data lost rows)")

    def _collate(self, cols: dict, epoch: int, plan, index: int, j: int):
        want = [self.index.keys[f] for f in plan.batches[j]]
        got = [str(k) for k in cols[KEY]]
        if got != want:  # guards the alignment that exact resume relies on
            raise IngestError(f"ingest order broken in epoch {epoch} batch {index}: expected keys "
                              f"{want[:3]}..., got {got[:3]}...")
        ok = np.asarray(cols[OK], dtype=bool)
        keep = None
        if not ok.all():
            bad = np.flatnonzero(~ok)
            first_bad = int(bad[0])
            if self.cfg.on_error == "raise":
                raise IngestError(str(cols[ERROR][first_bad]) + " (on_error='skip' would skip "
                                  "and count it)", shard=str(cols[ERR_SHARD][first_bad]),
                                  key=got[first_bad],
                                  member=str(cols[ERR_MEMBER][first_bad]) or None)
            for i in bad:
                log.warning("skipped bad sample: %s", cols[ERROR][i])
            self.skipped_total += len(bad)
            keep = ok
        meta = {"epoch": epoch, "batch_index": index, "rank": self.rank,
                "skipped": 0 if keep is None else int((~ok).sum()),
                "position": plan.end_position(j + 1), "task": self.task}
        return to_avbatch(cols, keep, meta)


# ============================================================================== plain Ray path
def read_split(url: str, split: str = "train", *, read_concurrency: int | None = None,
               decode: bool = True, storage_options: dict | None = None, **read_args):
    """``ray.data.read_webdataset`` over the shards the manifest lists (no storage listing).

    One row per sample: ``__key__`` plus one column per member suffix (decoded with the
    pickle-free ``decode_member`` when ``decode``, else raw bytes). ``read_concurrency`` caps
    concurrent read tasks. Split across training workers with ``ds.streaming_split(n,
    equal=True)``. This path has no per-sample sha256 check, no deterministic per-rank order
    and no mid-epoch resume; training uses ``ShardStream`` (see the module docstring)."""
    import pyarrow.fs as pafs
    import ray

    manifest = load_manifest(url, split, storage_options)
    fs, base = storage.filesystem(url, **(storage_options or {}))
    paths = [storage.join(base, s["name"]) for s in manifest["shards"]]
    if storage.is_local(url):
        filesystem = pafs.LocalFileSystem()
    else:
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    env = worker_env(url)
    if env:
        read_args.setdefault("runtime_env", env)
    return ray.data.read_webdataset(
        paths, filesystem=filesystem, concurrency=read_concurrency,
        decoder=_decode_row if decode else None, **read_args)


def _decode_row(sample: dict) -> dict:
    from data_pipeline.decode import decode_member

    out = {}
    for k, v in sample.items():
        if k.startswith("__") or not isinstance(v, (bytes, bytearray)):
            out[k] = v
            continue
        try:
            out[k] = decode_member(k, v)
        except Exception as e:
            raise IngestError(f"sample {sample.get('__key__')!r} member {k!r} does not decode "
                              f"({type(e).__name__}: {e})", key=sample.get("__key__"),
                              member=k) from None
    if "json" in out and isinstance(out["json"], (dict, list)):
        out["json"] = json.dumps(out["json"])  # a string column: label dicts differ per sample
    return out
