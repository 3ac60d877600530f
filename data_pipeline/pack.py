"""``pack``: official raw layout -> WebDataset shards on any fsspec URL.

Flow: list the split (annotations only) -> encode samples in worker processes (in key order)
-> write shards into a local *staging* directory, each with a journal entry -> when the whole
split encoded without a fatal error, *publish* every shard (a rename on local disk, a single
object upload on object storage) -> write the manifest last.

So a bad sample fails the split before any shard of it is visible, a crash at any point is
resumed by re-running the same command (finished staged shards are kept, the rest re-encoded
from the first sample after the last finished shard), and the bytes are identical to an
uninterrupted run because shard boundaries depend only on the sorted sample sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass

from tqdm import tqdm

from data_pipeline import media, storage
from data_pipeline.datasets import Dataset, as_dataset
from data_pipeline.datasets.base import RawSample
from data_pipeline.errors import DataPipelineError, LayoutError, SampleError
from data_pipeline.schema import (
    DEFAULT_FRAME_SIZE, DEFAULT_JPEG_QUALITY, DEFAULT_MASK_SIZE, DEFAULT_SHARD_BYTES,
    LABELS_MEMBER, SAMPLE_RATE, SCHEMA_VERSION, frame_member, manifest_name, shard_name)
from data_pipeline.tario import DeterministicTarWriter, sample_size

log = logging.getLogger("data_pipeline.pack")


@dataclass(frozen=True)
class PackOptions:
    frame_size: int = DEFAULT_FRAME_SIZE
    mask_size: int = DEFAULT_MASK_SIZE
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    audio_format: str = "npy"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    shard_samples: int = 0  # 0 = no sample cap, size alone decides
    from_videos: bool = False
    on_error: str = "raise"  # or "skip"
    trust_pickle: bool = False

    def validate(self) -> None:
        if self.audio_format not in ("npy", "flac"):
            raise DataPipelineError(f"--audio-format must be npy or flac, got {self.audio_format!r}")
        if self.on_error not in ("raise", "skip"):
            raise DataPipelineError(f"--on-error must be raise or skip, got {self.on_error!r}")
        for name in ("frame_size", "mask_size", "shard_bytes"):
            if getattr(self, name) <= 0:
                raise DataPipelineError(f"--{name.replace('_', '-')} must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataPipelineError("--jpeg-quality must be in 1..100")

    def manifest_options(self) -> dict:
        d = asdict(self)
        d.pop("trust_pickle")  # how the input was read, not what the shards hold
        return d


@dataclass
class PackResult:
    manifest: dict
    url: str
    encoded: int  # samples encoded in this run (fewer than the split after a resume)


# ------------------------------------------------------------------------------ encoding
_WORKER: dict = {}


def _init_worker(dataset: Dataset, opts: PackOptions, src: str) -> None:
    # the Dataset object itself (pickled by reference to its class): a worker process never
    # looks a dataset up by name, so a plug-in registered only in the caller packs too
    _WORKER.update(dataset=dataset, opts=opts, src=src)


def encode_sample(sample: RawSample, dataset: Dataset,
                  opts: PackOptions) -> list[tuple[str, bytes]]:
    """All members of one sample (suffix, bytes); raises SampleError naming what is wrong."""
    if sample.error is not None:
        raise sample.error
    key, segments = sample.key, dataset.segments
    members: list[tuple[str, bytes]] = []
    if sample.video is not None:
        frames, wave = media.decode_video(sample.video, key, segments, dataset.clip_seconds)
        for t, img in enumerate(frames):
            img = img.convert("RGB").resize((opts.frame_size, opts.frame_size), media.Image.BICUBIC)
            members.append((frame_member(t), media.jpeg_bytes(img, opts.jpeg_quality)))
        audio_path = sample.video
    else:
        if len(sample.frames) != segments:
            raise SampleError(key, None, f"expected {segments} frames, found {len(sample.frames)}")
        for t, path in enumerate(sample.frames):
            members.append((frame_member(t), media.encode_frame(path, key, opts)))
        ref = sample.audio
        audio_path = ref.path
        if ref.kind == "npy":
            wave = media.load_npy(ref.path, key, "audio")
        elif ref.kind == "pickle":
            wave = media.load_pickled_wave(ref.path, ref.entry, key, opts.trust_pickle)
        elif ref.kind == "wav":
            wave = media.load_wav_resampled(ref.path, key)
        else:
            raise ValueError(f"unknown audio source kind {ref.kind!r}")
    wave = media.check_wave(wave, key, audio_path, dataset.audio_samples)
    members.append(media.encode_audio(wave, opts.audio_format))
    members += dataset.encode_extra(sample, opts)
    members.append((LABELS_MEMBER, media.json_bytes(sample.labels)))
    return members


def _encode_task(sample: RawSample):
    try:
        return sample.key, encode_sample(sample, _WORKER["dataset"], _WORKER["opts"]), None
    except SampleError as e:
        if _WORKER["opts"].on_error == "skip":
            return sample.key, None, _relative(str(e), _WORKER["src"])
        raise


def _relative(message: str, src: str) -> str:
    # manifests stay byte-identical wherever the source directory lies
    return message.replace(os.path.abspath(src).rstrip("/") + "/", "<src>/")


# ------------------------------------------------------------------------------ staging
class Staging:
    """A local directory of finished shards (``*.tar``) and their journal entries (``*.json``)."""

    def __init__(self, path: str, fingerprint: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        fp_file = os.path.join(path, "fingerprint")
        if os.path.exists(fp_file):
            with open(fp_file) as f:
                old = f.read()
            if old != fingerprint:
                raise DataPipelineError(
                    f"staging directory {path} holds an unfinished pack with different input or "
                    "options; re-run with the same options to resume it, or delete the directory")
        else:
            _atomic_write(fp_file, fingerprint.encode())

    def journal(self) -> list[dict]:
        """Entries of the finished shards 0..k-1 (stops at the first gap)."""
        entries = []
        while True:
            p = os.path.join(self.path, f"{len(entries):06d}.json")
            if not os.path.exists(p):
                return entries
            with open(p) as f:
                entries.append(json.load(f))

    def record(self, index: int, entry: dict) -> None:
        _atomic_write(os.path.join(self.path, f"{index:06d}.json"), media.json_bytes(entry))


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_staging_dir(out: str, split: str) -> str:
    if storage.is_local(out):
        return os.path.join(storage.local_path(out), f".staging-{split}")
    digest = hashlib.sha256(f"{out}|{split}".encode()).hexdigest()[:16]
    return os.path.join(storage.cache_dir(), "pack-staging", digest)


# ------------------------------------------------------------------------------ pack
def pack(dataset: str | Dataset, src: str, split: str, out: str, opts: PackOptions | None = None,
         workers: int = 1, staging_dir: str | None = None, overwrite: bool = False,
         videos_dir: str | None = None, progress: bool = True,
         _stop_after_shards: int | None = None) -> PackResult:
    """Pack one split of ``dataset`` (a registered name, or a ``Dataset``).
    ``_stop_after_shards`` is for tests of crash-resume: it stops (as a kill would) after that
    many shards were staged."""
    opts = opts or PackOptions()
    opts.validate()
    ds = as_dataset(dataset)
    dataset = ds.name
    if not os.path.isdir(src):
        raise LayoutError(f"source directory {src} does not exist")
    listing = ds.list_split(src, split, from_videos=opts.from_videos, videos_dir=videos_dir)
    samples = sorted(listing.samples, key=lambda s: s.key)
    if not samples:
        raise LayoutError(f"{dataset} {split}: the annotations list no samples")

    manifest_head = {
        "schema_version": SCHEMA_VERSION, "dataset": dataset, "task": ds.task,
        "split": split, "segments": ds.segments, "sample_rate": SAMPLE_RATE,
        "options": opts.manifest_options(), "label_vocab": listing.label_vocab,
    }
    fingerprint = hashlib.sha256(media.json_bytes(
        {**manifest_head, "samples": [(s.key, s.labels) for s in samples]})).hexdigest()

    fs, out_path = storage.filesystem(out)
    manifest_url = storage.join(out_path, manifest_name(split))
    if fs.exists(manifest_url):
        existing = json.loads(fs.cat_file(manifest_url))
        if existing.get("fingerprint") == fingerprint:
            log.info("%s already holds this pack (same input and options); nothing to do", out)
            return PackResult(existing, out, 0)
        if not overwrite:
            raise DataPipelineError(f"{out} already holds a {split} pack with other input or "
                                    "options; pass --overwrite to replace it")

    staging = Staging(staging_dir or default_staging_dir(out, split), fingerprint)
    journal = staging.journal()
    start = 0
    if journal:
        last = journal[-1]["last_key"]
        start = next(i for i, s in enumerate(samples) if s.key == last) + 1
    todo = samples[start:]
    encoded = _encode_and_stage(ds, src, opts, workers, staging, journal, todo, split,
                                progress, _stop_after_shards)
    if _stop_after_shards is not None and encoded is None:
        return PackResult({}, out, 0)
    journal = staging.journal()
    trailing_skips = encoded["trailing_skips"]

    _publish(fs, out_path, staging, journal)
    shards = [{k: e[k] for k in ("name", "samples", "bytes", "sha256", "keys", "spans",
                                 "sample_sha256")} for e in journal]
    skipped = [s for e in journal for s in e["skipped"]] + trailing_skips
    manifest = {
        **manifest_head,
        "fingerprint": fingerprint,
        "num_samples": sum(s["samples"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": shards,
    }
    if not shards:
        raise DataPipelineError(f"{dataset} {split}: every sample was skipped; nothing to publish")
    _write_manifest(fs, manifest_url, manifest)
    _remove_stale_shards(fs, out_path, split, {s["name"] for s in shards})
    shutil.rmtree(staging.path, ignore_errors=True)
    return PackResult(manifest, out, encoded["count"])


def _encode_and_stage(dataset, src, opts, workers, staging, journal, todo, split, progress,
                      stop_after):
    index = len(journal)
    cur = None  # (writer, file, tmp path, keys, size estimate)
    skipped_since: list[dict] = []
    count = 0

    def open_shard():
        tmp = os.path.join(staging.path, shard_name(split, index) + ".partial")
        f = open(tmp, "wb")
        return {"writer": DeterministicTarWriter(f), "file": f, "tmp": tmp, "keys": [], "size": 0,
                "spans": [], "sha": []}

    def close_shard():
        nonlocal cur, index, skipped_since
        nbytes, sha = cur["writer"].close()
        cur["file"].flush()
        os.fsync(cur["file"].fileno())
        cur["file"].close()
        name = shard_name(split, index)
        os.replace(cur["tmp"], os.path.join(staging.path, name))
        staging.record(index, {"name": name, "samples": len(cur["keys"]), "bytes": nbytes,
                               "sha256": sha, "keys": cur["keys"], "spans": cur["spans"],
                               "sample_sha256": cur["sha"], "last_key": cur["keys"][-1],
                               "skipped": skipped_since})
        index += 1
        skipped_since = []
        cur = None

    results = _run_encoder(dataset, src, opts, workers, todo)
    bar = tqdm(total=len(todo), desc=f"pack {dataset.name}/{split}", unit="sample",
               disable=not progress or None)
    try:
        for key, members, error in results:
            bar.update(1)
            if members is None:
                skipped_since.append({"key": key, "error": error})
                log.warning("skipped %s", error)
                continue
            size = sample_size(members, key)
            if cur is not None and (cur["size"] + size > opts.shard_bytes or
                                    (opts.shard_samples and len(cur["keys"]) >= opts.shard_samples)):
                close_shard()
                if stop_after is not None and index >= stop_after:
                    return None
            if cur is None:
                cur = open_shard()
            offset, length, sample_sha = cur["writer"].add_sample(key, members)
            cur["spans"].append([offset, length])
            cur["sha"].append(sample_sha)
            cur["keys"].append(key)
            cur["size"] += size
            count += 1
        if cur is not None:
            close_shard()
    finally:
        bar.close()
        if cur is not None:  # an error mid-shard: drop the partial file, keep finished shards
            cur["file"].close()
            os.unlink(cur["tmp"])
        close = getattr(results, "close", None)
        if close:
            close()
    return {"count": count, "trailing_skips": skipped_since}


def _run_encoder(dataset, src, opts, workers, todo):
    if workers <= 1:
        _init_worker(dataset, opts, src)
        return (_encode_task(s) for s in todo)
    # spawn: the caller may hold threads (Ray, torch) that fork would copy in a broken state
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(dataset, opts, src))

    def gen():
        try:
            yield from pool.imap(_encode_task, todo, chunksize=4)
        finally:
            pool.terminate()
            pool.join()

    return gen()


def _publish(fs, out_path: str, staging: Staging, journal: list[dict]) -> None:
    local = _is_local_fs(fs)
    if local:
        os.makedirs(out_path, exist_ok=True)
    else:
        fs.makedirs(out_path, exist_ok=True)
    for entry in journal:
        staged = os.path.join(staging.path, entry["name"])
        dest = storage.join(out_path, entry["name"])
        if not os.path.exists(staged):
            # published by an earlier, interrupted run (a local rename moves the file)
            if fs.exists(dest) and fs.size(dest) == entry["bytes"]:
                continue
            raise DataPipelineError(f"staged shard {staged} is missing and {dest} does not match "
                                    "its journal; delete the staging directory and pack again")
        if local:
            os.replace(staged, dest)  # atomic: visible only complete
        else:
            fs.put_file(staged, dest)  # one object, visible only when the upload completes


def _write_manifest(fs, url: str, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    if _is_local_fs(fs):
        _atomic_write(url, data)
    else:
        fs.pipe_file(url, data)


def _remove_stale_shards(fs, out_path: str, split: str, keep: set[str]) -> None:
    """Shards of this split left by an earlier, larger pack (after --overwrite)."""
    prefix = f"{split}-"
    for p in fs.ls(out_path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".tar") and name not in keep:
            log.warning("removing stale shard %s", p)
            fs.rm_file(p)


def _is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
