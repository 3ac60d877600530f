"""Streaming ingest: WebDataset shards at any fsspec URL -> Ray Data decode tasks -> ``AVBatch``
on each training worker.

``ShardStream`` (what the trainer uses; ``data_pipeline.raydata.read_split`` is the plain Ray
Data path for ad-hoc jobs)
    Per rank, per epoch, a deterministic plan (``data_pipeline.plan``: shard order seeded by
    (seed, epoch), then a window shuffle of ``shuffle_buffer`` positions, dealt to ranks one
    global batch at a time) is cut into *tasks* of about one window's share each. Every task is
    one Ray Data CPU task (``data_pipeline.decode_task``) that
      1. fetches the raw bytes of its samples with ranged reads (the manifest's byte spans,
         adjacent spans merged into one request, requests issued concurrently through
         ``fs.cat_ranges``) -- this is the bounded buffer of **raw, undecoded** samples, at most
         ~``shuffle_buffer / world_size`` of them per task;
      2. checks each sample's sha256 against the manifest, parses its tar members, checks them
         against the schema;
      3. decodes JPEG frames (simplejpeg / libjpeg-turbo, straight into the output array),
         int16 audio, the dataset's extra members (masks, features) and labels into
         fixed-shape numpy columns (``data_pipeline.sample``), and yields one block per plan
         batch.
    The worker iterates the blocks in plan order (``preserve_order``) with
    ``prefetch_batches`` of lookahead and wraps each batch into an ``AVBatch`` (uint8 frames,
    int16 audio: resize / normalise / mel happen on the training device).

    Why not ``ray.data.read_webdataset`` + ``streaming_split`` for training: neither gives an
    exact mid-epoch resume (Ray's iterators are not resumable, ray-project/ray #37633), the
    split does not give every rank the same, deterministic sample sequence, and whole-shard
    reads cannot check a sample against its manifest sha256 before decoding it. Planned ranged
    reads give all three, and skip the consumed prefix of an epoch without reading it.

Where JPEG frames are decoded (``IngestConfig.decode_on``; measured in bench/README.md,
"Decode placement")
    "ingest": in the decode tasks (step 3 above); the decoded uint8 frames (~10x the JPEG
        bytes) cross the object store and, when the tasks run on other nodes, the network.
    "trainer": the tasks do steps 1-2, audio, extras and labels, and ship each sample's JPEG
        frame members as bytes; the consuming worker decodes them with a thread pool
        (``data_pipeline.frame_decode``: simplejpeg releases the GIL; ``decode_threads``,
        default the worker's CPUs), one batch ahead of the trainer. The batches are
        bit-identical to "ingest", bad frames give the same errors.
    "gpu": as "trainer", decoded by nvJPEG on the worker's CUDA device in one batched
        ``torchvision.io.decode_jpeg`` call per batch (frames arrive on the GPU).
    "auto" (default): "ingest" when ``decode_resources`` names a custom resource (the decode
        tasks are placed on dedicated ingest nodes, e.g. ``{"ingest": 1}``: the deployment
        moved decode CPU off the training nodes) or when the consumer sees a CUDA device (GPU
        training: no measured choice yet; "gpu" is the candidate), else ``AUTO_DECODE_ON``
        (CPU training: the measured choice).
    ``ray_dataset()`` (batch inference's ``map_batches``) always decodes in the tasks.

First batch. The first tasks of an epoch cover 1, 2, 4, ... plan batches (up to a window
share): a task reads its whole share before it decodes, so a first task of a full share would
delay the first batch by reading (and queueing behind) a whole window. The grouping of batches
into tasks changes nothing in the plan, the order or the resume.

The split's ``Dataset`` (``data_pipeline.datasets``) is resolved here, on the driver, from the
manifest's ``dataset`` and handed to the decode tasks as an object, so a plug-in dataset
registered only in the driver streams too.

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
(``object_store_budget``) applies backpressure, and the consumer holds ``prefetch_batches``
(with ``decode_on`` "trainer" / "gpu": as JPEG bytes, plus one batch decoding ahead).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from data_pipeline import storage
from data_pipeline.datasets import get_dataset
from data_pipeline.decode_task import decode_task, warm_up
from data_pipeline.errors import IngestError, ManifestError, UnknownDatasetError
from data_pipeline.manifest import load_manifest
from data_pipeline.plan import SplitIndex, epoch_order, num_full_batches, rank_plan
from data_pipeline.sample import (ERR_MEMBER, ERR_SHARD, ERROR, KEY, OK, SampleSpec,
                                  empty_columns, to_avbatch)

__all__ = ["IngestConfig", "IngestError", "ShardStream"]

log = logging.getLogger("data_pipeline.ingest")

STATE_VERSION = 1
DECODE_ON = ("auto", "ingest", "trainer", "gpu")
# decode_on="auto" on one machine (no dedicated ingest nodes): the measured choice,
# bench/README.md "Decode placement"
AUTO_DECODE_ON = "trainer"
WARM_WORKERS = 4  # at most this many decode workers warmed per stream (see ShardStream._warm_up)


@dataclass
class IngestConfig:
    """Configuration of one split's stream: what the trainer (``avmoe.train.loop``) sets per
    split and passes to ``ShardStream``.

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
    decode_on: where JPEG frames are decoded: "ingest" (the decode tasks), "trainer" (this
        process, a thread pool), "gpu" (this process's CUDA device, nvJPEG) or "auto"; see the
        module docstring.
    decode_threads: threads decoding frames in this process ("trainer"); None = the CPUs this
        process holds (a Ray Train worker: its ``cpus_per_worker``).
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
    decode_on: str = "auto"
    decode_threads: int | None = None

    def validate(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise IngestError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        for name in ("batch_size", "shuffle_buffer", "prefetch_batches"):
            if int(getattr(self, name)) < (0 if name == "prefetch_batches" else 1):
                raise IngestError(f"IngestConfig.{name} must be positive, got "
                                  f"{getattr(self, name)!r}")
        if self.read_concurrency is not None and self.read_concurrency < 1:
            raise IngestError(f"read_concurrency must be >= 1 or None, got {self.read_concurrency}")
        if self.decode_on not in DECODE_ON:
            raise IngestError(f"decode_on must be one of {', '.join(DECODE_ON)}; got "
                              f"{self.decode_on!r}")
        if self.decode_threads is not None and int(self.decode_threads) < 1:
            raise IngestError(f"decode_threads must be >= 1 or None, got {self.decode_threads}")
        if self.decode_on == "gpu":
            import torch

            if not torch.cuda.is_available():
                raise IngestError("decode_on='gpu' needs a CUDA device (nvJPEG through "
                                  "torchvision.io.decode_jpeg) and this process sees none: use "
                                  "decode_on='trainer' or 'ingest'")

    def resolved_decode_on(self) -> str:
        """``decode_on`` with "auto" resolved in this (the consuming) process (see the module
        docstring)."""
        if self.decode_on != "auto":
            return self.decode_on
        if set(self.decode_resources or {}) - {"CPU", "GPU", "memory"}:
            return "ingest"  # the decode tasks are placed on dedicated (ingest) nodes
        import torch

        if torch.cuda.is_available():
            return "ingest"  # GPU training: not measured yet ("gpu" is the candidate)
        return AUTO_DECODE_ON


# ============================================================================== the stream
class ShardStream:
    """One rank's stream of a split: the interface the trainer iterates (``epoch``,
    ``resume``, ``state``, ``batches_per_epoch``); see the module docstring."""

    def __init__(self, cfg: IngestConfig, rank: int = 0, world_size: int = 1):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise IngestError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        try:  # load_manifest checks every field the plan and the decode tasks rely on
            self.manifest = load_manifest(cfg.url, cfg.split, cfg.storage_options)
            self.dataset = get_dataset(self.manifest["dataset"])
            self.spec = SampleSpec.from_manifest(self.manifest, self.dataset)
        except ManifestError as e:
            raise IngestError(f"{cfg.url} {cfg.split}: {e}" if e.url is None else str(e),
                              shard=e.url) from None
        except UnknownDatasetError as e:
            raise IngestError(f"{cfg.url} {cfg.split}: {e}") from None
        self.task = self.manifest["dataset"]
        self.index = SplitIndex(self.manifest)
        self.num_samples = self.index.num_samples
        self.skipped_total = 0
        self._origin: dict[int, tuple[int, int]] = {}  # epoch -> (start position, first index)
        self._orders: dict[int, np.ndarray] = {}
        self.decode_on = cfg.resolved_decode_on()
        self._frames = None  # FrameDecoder, made on first use ("trainer", "gpu")
        if cfg.drop_last and self.batches_per_epoch == 0:
            raise IngestError(f"{cfg.url} {cfg.split}: {self.num_samples} samples give no full "
                              f"batch of {cfg.batch_size} on each of {world_size} ranks")
        self._warming: list = []
        self._warm_up()

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
        """Group plan batches into decode tasks of about one window share each; the first tasks
        of the epoch cover 1, 2, 4, ... batches (see "First batch" in the module docstring)."""
        per_task = max(1, self.cfg.shuffle_buffer // (self.cfg.batch_size * self.world_size))
        tasks, row, lo, size = [], 0, 0, 1
        while lo < len(plan.batches):
            n = min(size, per_task)
            size *= 2
            group = []
            for b in plan.batches[lo:lo + n]:
                items = []
                for f in b:
                    shard, key, off, length, sha = self.index.item(int(f))
                    items.append([row, self.index.shard_names[shard], key, off, length, sha])
                    row += 1
                group.append(items)
            tasks.append(json.dumps({"batches": group}))
            row = 0
            lo += n
        return tasks

    def ray_dataset(self, epoch: int, start_batch: int = 0, start_sample: int | None = None):
        """The Ray Dataset of this rank's epoch (lazy; one block per plan batch; decoded columns,
        whatever ``decode_on`` says). (Not ``dataset``: that attribute is the ``Dataset`` of
        the split.)"""
        return self._dataset(self._plan(epoch, start_batch, start_sample))

    def _remote_options(self) -> dict:
        """Ray options of one decode task (resources, runtime_env)."""
        res = dict(self.cfg.decode_resources or {"CPU": 1})
        remote: dict = {"num_cpus": res.pop("CPU", 1)}
        if res.get("GPU"):
            remote["num_gpus"] = res.pop("GPU")
        if res:
            remote["resources"] = res
        env = storage.worker_env(self.cfg.url)
        if env:
            remote["runtime_env"] = env
        return remote

    def _warm_up(self) -> None:
        """Start warming the worker processes that the first decode tasks will run in (their
        imports of Ray Data and of the decode task, ~2-3 s of a fresh Ray's first batch), while
        the caller goes on (the trainer builds its model). Only when Ray is up; nothing waits for
        it, and it never raises: a warm-up that fails leaves a cold start."""
        try:
            import ray

            if not ray.is_initialized():
                return
            remote = self._remote_options()
            per = max(float(remote["num_cpus"]), 1e-3)
            n = self.cfg.read_concurrency or int(ray.cluster_resources().get("CPU", 1) // per)
            fn = ray.remote(warm_up).options(**remote, max_retries=0)
            self._warming = [fn.remote(self.cfg.url, dict(self.cfg.storage_options))
                             for _ in range(max(1, min(n, WARM_WORKERS)))]
        except Exception as e:  # pragma: no cover - best effort
            log.debug("ingest warm-up not started: %s", e)

    def _dataset(self, plan, decode_frames: bool = True):
        import ray
        if not ray.is_initialized():
            raise IngestError("ShardStream needs Ray: call avmoe.ray_env.init_local_ray() (or run "
                              "inside a Ray Train worker)")
        tasks = self._tasks(plan)
        ds = ray.data.from_items([{"spec": t} for t in tasks],
                                 override_num_blocks=max(1, len(tasks)))
        remote = self._remote_options()
        local = storage.is_local(self.cfg.url)
        ds = ds.map_batches(
            decode_task, batch_size=1, batch_format="numpy", zero_copy_batch=True,
            concurrency=self.cfg.read_concurrency,
            fn_kwargs={"base": self.cfg.url, "spec": self.spec.to_dict(),
                       "storage_options": dict(self.cfg.storage_options),
                       # one request per run of nearby samples; on local disk only adjacent
                       "max_gap": 0 if local else 1 << 20,
                       "dataset": self.dataset, "decode_frames": decode_frames},
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
            v.nbytes for v in empty_columns(self.spec, self.cfg.batch_size, self.dataset,
                                            frames=decode_frames).values()))
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        return ds

    def _frame_decoder(self):
        if self._frames is None:
            from data_pipeline.frame_decode import FrameDecoder

            self._frames = FrameDecoder(self.spec, self.decode_on, self.cfg.decode_threads)
        return self._frames

    def _iterate(self, epoch: int, plan, first: int):
        if not plan.batches:
            return
        frames = None if self.decode_on == "ingest" else self._frame_decoder()
        ds = self._dataset(plan, decode_frames=frames is None)
        it = ds.iter_batches(batch_size=None, batch_format="numpy",
                             prefetch_batches=self.cfg.prefetch_batches)
        pending = None  # blocks are one plan batch each; re-cut defensively if Ray split them
        ready: deque = deque()  # (cols or a FrameDecoder handle, j): batch j+1 decodes during j
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
                self._check_keys(cur, epoch, plan, first + j, j)
                if frames is not None:
                    shards = [self.index.shard_names[self.index.shard_of[f]]
                              for f in plan.batches[j]]
                    cur = frames.submit(cur, shards)
                ready.append((cur, j))
                j += 1
                # consumer-side decode runs one batch ahead, except for the epoch's first
                # batch (nothing to overlap it with yet: it would only wait for the next block)
                if len(ready) > (0 if frames is None or j == 1 else 1):
                    yield self._collate(*ready.popleft(), epoch, plan, first)
        while ready:
            yield self._collate(*ready.popleft(), epoch, plan, first)
        if j != len(plan.batches) or pending is not None:
            raise IngestError(f"ingest of epoch {epoch} rank {self.rank} ended after {j} of "
                              f"{len(plan.batches)} batches (Ray Data lost rows)")

    def _check_keys(self, cols: dict, epoch: int, plan, index: int, j: int) -> None:
        want = [self.index.keys[f] for f in plan.batches[j]]
        got = [str(k) for k in cols[KEY]]
        if got != want:  # guards the alignment that exact resume relies on
            raise IngestError(f"ingest order broken in epoch {epoch} batch {index}: expected keys "
                              f"{want[:3]}..., got {got[:3]}...")

    def _collate(self, cols, j: int, epoch: int, plan, first: int):
        if not isinstance(cols, dict):  # a FrameDecoder handle
            cols = cols.result()
        index = first + j
        got = [str(k) for k in cols[KEY]]
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
