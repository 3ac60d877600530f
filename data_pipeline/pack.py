"""``pack``: official raw layout -> WebDataset shards on any fsspec URL.

Flow: list the split (annotations only) -> take the split's lock at the output
(``data_pipeline.lock``: a second pack racing to the same split stops with a ``PackError``) ->
encode samples in worker processes (in key order) -> write shards into a local *staging*
directory, each with a journal entry -> when the whole split encoded without a fatal error,
*publish*: upload (object storage) or rename (local disk) every shard, then write the manifest,
then remove the previous pack's shards.

Publication is one atomic switch. Shard names carry the pack's *generation* (a prefix of its
fingerprint: input listing + options), so a new pack never writes under a name the old
manifest lists; readers take shard names from the manifest only, and the manifest is replaced
in one step (a rename; one object PUT). A reader therefore sees the old pack or the new one,
never a mix, whenever the pack stops: before the manifest, the old manifest still names the
old, untouched shards (the new ones are unlisted files the re-run reuses); after it, the new
manifest names the new shards. The old generation is removed only after the switch (a reader
still streaming the old pack then gets a named "shard missing" error, not other bytes).

So a bad sample fails the split before any shard of it is visible, a crash at any point is
resumed by re-running the same command (finished staged shards are kept, the rest re-encoded
from the first sample after the last finished shard), and the bytes (and names) are identical
to an uninterrupted run because shard boundaries depend only on the sorted sample sequence.
A write that fails (disk full, permissions) is a ``PackError`` naming the file; what was
staged is kept for the resume.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass

from tqdm import tqdm

from data_pipeline import media, storage
from data_pipeline.datasets import Dataset, as_dataset
from data_pipeline.datasets.base import RawSample
from data_pipeline.errors import DataPipelineError, LayoutError, PackError, SampleError
from data_pipeline.lock import SplitLock
from data_pipeline.schema import (
    DEFAULT_FRAME_SIZE, DEFAULT_JPEG_QUALITY, DEFAULT_MASK_SIZE, DEFAULT_SHARD_BYTES,
    LABELS_MEMBER, MAX_FRAME_SIZE, MAX_MASK_SIZE, SAMPLE_RATE, SCHEMA_VERSION, frame_member,
    is_shard_of, manifest_name, shard_name)
from data_pipeline.tario import DeterministicTarWriter, sample_size
from data_pipeline.units import parse_size

log = logging.getLogger("data_pipeline.pack")


@dataclass(frozen=True)
class PackOptions:
    frame_size: int = DEFAULT_FRAME_SIZE
    mask_size: int = DEFAULT_MASK_SIZE
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    audio_format: str = "npy"
    shard_bytes: int | str = DEFAULT_SHARD_BYTES  # bytes, or a size: "256MB" (10^6), "256MiB" (2^20)
    shard_samples: int = 0  # 0 = no sample cap, size alone decides
    from_videos: bool = False
    on_error: str = "raise"  # or "skip"
    trust_pickle: bool = False

    def __post_init__(self):
        try:  # one unit system with the CLI's --shard-size (data_pipeline.units)
            object.__setattr__(self, "shard_bytes", parse_size(self.shard_bytes))
        except ValueError as e:
            raise PackError(f"--shard-size / shard_bytes: {e}") from None

    def validate(self) -> None:
        if self.audio_format not in ("npy", "flac"):
            raise DataPipelineError(f"--audio-format must be npy or flac, got {self.audio_format!r}")
        if self.on_error not in ("raise", "skip"):
            raise DataPipelineError(f"--on-error must be raise or skip, got {self.on_error!r}")
        for name in ("frame_size", "mask_size", "shard_bytes"):
            if getattr(self, name) <= 0:
                raise DataPipelineError(f"--{name.replace('_', '-')} must be positive")
        for name, top in (("frame_size", MAX_FRAME_SIZE), ("mask_size", MAX_MASK_SIZE)):
            if getattr(self, name) > top:  # readers refuse manifests beyond these bounds
                raise DataPipelineError(f"--{name.replace('_', '-')} must be at most {top}")
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


def video_frames(video: str, key: str, dataset: Dataset, opts: PackOptions):
    """(frame members, the raw wave) of a video: PyAV decode (one frame per segment, 32 kHz mono),
    frames resized to ``frame_size`` and JPEG-encoded. ``pack --from-videos`` and
    ``avmoe.predict --video`` both take this path, so a model sees a user's video as it saw its
    training shards."""
    frames, wave = media.decode_video(video, key, dataset.segments, dataset.clip_seconds)
    members = []
    for t, img in enumerate(frames):
        img = img.convert("RGB").resize((opts.frame_size, opts.frame_size), media.Image.BICUBIC)
        members.append((frame_member(t), media.jpeg_bytes(img, opts.jpeg_quality)))
    return members, wave


def video_sample_members(video: str, key: str, dataset: Dataset, opts: PackOptions, labels: dict,
                         extra: list[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    """Every member of a sample made from a video alone, as ``encode_sample`` writes it: its
    frames and audio, the dataset's ``extra`` members and ``labels``."""
    members, wave = video_frames(video, key, dataset, opts)
    wave = media.check_wave(wave, key, video, dataset.audio_samples, dataset.segments)
    members.append(media.encode_audio(wave, opts.audio_format))
    members += list(extra)
    members.append((LABELS_MEMBER, media.json_bytes(labels)))
    return members


def encode_sample(sample: RawSample, dataset: Dataset,
                  opts: PackOptions) -> list[tuple[str, bytes]]:
    """All members of one sample (suffix, bytes); raises SampleError naming what is wrong."""
    if sample.error is not None:
        raise sample.error
    key, segments = sample.key, dataset.segments
    members: list[tuple[str, bytes]] = []
    if sample.video is not None:
        members, wave = video_frames(sample.video, key, dataset, opts)
        audio_path = sample.video
    else:
        if len(sample.frames) != segments:
            raise SampleError(key, None, f"expected {segments} frames, found {len(sample.frames)}")
        for t, path in enumerate(sample.frames):
            members.append((frame_member(t), media.encode_frame(path, key, opts)))
        ref = sample.audio
        audio_path = ref.path
        if ref.kind == "npy":
            wave = media.load_npy(ref.path, key, "audio", max_elements=2 * dataset.audio_samples)
        elif ref.kind == "pickle":
            wave = media.load_pickled_wave(ref.path, ref.entry, key, opts.trust_pickle)
        elif ref.kind == "wav":
            wave = media.load_wav_resampled(ref.path, key)
        else:
            raise ValueError(f"unknown audio source kind {ref.kind!r}")
    wave = media.check_wave(wave, key, audio_path, dataset.audio_samples, segments)
    members.append(media.encode_audio(wave, opts.audio_format))
    members += dataset.encode_extra(sample, opts)
    members.append((LABELS_MEMBER, media.json_bytes(sample.labels)))
    return members


# Exceptions that bad *input* can raise from the decoders (numpy, PIL, soundfile, zlib) where a
# check of ours did not catch it first: they fail (or, with --on-error skip, skip) that sample
# under its key instead of ending the pack with a traceback.
_INPUT_ERRORS = (ValueError, TypeError, OSError, EOFError, struct.error, zlib.error,
                 media.Image.DecompressionBombError)


def _encode_task(sample: RawSample):
    try:
        try:
            return sample.key, encode_sample(sample, _WORKER["dataset"], _WORKER["opts"]), None
        except SampleError:
            raise
        except _INPUT_ERRORS as e:
            raise SampleError(sample.key, None, f"cannot be packed ({type(e).__name__}: {e})") \
                from None
    except SampleError as e:
        if _WORKER["opts"].on_error == "skip":
            return sample.key, None, _relative(str(e), _WORKER["src"])
        raise


def _relative(message: str, src: str) -> str:
    # manifests stay byte-identical wherever the source directory lies
    return message.replace(os.path.abspath(src).rstrip("/") + "/", "<src>/")


# ------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def _writing(path: str):
    """An ``OSError`` while writing ``path`` becomes a ``PackError`` naming it (disk full,
    permissions, a read-only mount); finished staged shards stay for the resume."""
    try:
        yield
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = ("; free some space and re-run the same command: the finished shards are kept "
                "and the pack resumes" if full else "")
        raise PackError(f"{path}: cannot write ({e.strerror or e}){hint}") from None


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with _writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# ------------------------------------------------------------------------------ staging
class Staging:
    """A local directory of finished shards (``*.tar``) and their journal entries (``*.json``)."""

    def __init__(self, path: str, fingerprint: str):
        self.path = path
        if os.path.exists(path) and not os.path.isdir(path):
            raise PackError(f"staging directory {path} is a file (--staging names a directory)")
        with _writing(path):
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
            try:
                with open(p) as f:
                    entries.append(json.load(f))
            except (OSError, ValueError) as e:
                raise PackError(f"staging journal {p} is unreadable ({e}); delete the staging "
                                f"directory {self.path} and pack again") from None

    def record(self, index: int, entry: dict) -> None:
        _atomic_write(os.path.join(self.path, f"{index:06d}.json"), media.json_bytes(entry))


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
    refuse_paths_outside(samples, [src] + ([videos_dir] if videos_dir else []))

    manifest_head = {
        "schema_version": SCHEMA_VERSION, "dataset": dataset, "task": ds.task,
        "split": split, "segments": ds.segments, "sample_rate": SAMPLE_RATE,
        "options": opts.manifest_options(), "label_vocab": listing.label_vocab,
    }
    fingerprint = hashlib.sha256(media.json_bytes(
        {**manifest_head, "samples": [(s.key, s.labels) for s in samples]})).hexdigest()

    fs, out_path = storage.filesystem(out)
    local = storage.is_local_fs(fs)
    _make_output_dir(fs, out_path, out, local)
    with SplitLock(fs, out_path, split, local, out):
        return _pack_locked(ds, src, split, out, opts, workers, staging_dir, overwrite,
                            progress, _stop_after_shards, samples, manifest_head, fingerprint,
                            fs, out_path, local)


def _pack_locked(ds, src, split, out, opts, workers, staging_dir, overwrite, progress,
                 stop_after, samples, manifest_head, fingerprint, fs, out_path, local):
    manifest_url = storage.join(out_path, manifest_name(split))
    existing = _existing_manifest(fs, manifest_url, overwrite)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            log.info("%s already holds this pack (same input and options); nothing to do", out)
            return PackResult(existing, out, 0)
        if not overwrite:
            raise DataPipelineError(f"{out} already holds a {split} pack with other input or "
                                    "options; pass --overwrite to replace it")

    staging = Staging(staging_dir or default_staging_dir(out, split), fingerprint)
    generation = fingerprint[:12]
    journal = staging.journal()
    start = 0
    if journal:
        last = journal[-1]["last_key"]
        start = next(i for i, s in enumerate(samples) if s.key == last) + 1
    todo = samples[start:]
    encoded = _encode_and_stage(ds, src, opts, workers, staging, journal, todo, split,
                                generation, progress, stop_after)
    if stop_after is not None and encoded is None:
        return PackResult({}, out, 0)
    journal = staging.journal()
    trailing_skips = encoded["trailing_skips"]

    shards = [{k: e[k] for k in ("name", "samples", "bytes", "sha256", "keys", "spans",
                                 "sample_sha256")} for e in journal]
    skipped = [s for e in journal for s in e["skipped"]] + trailing_skips
    if not shards:
        raise DataPipelineError(f"{ds.name} {split}: every sample was skipped; nothing to publish")
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
    # publication: new shards (names no manifest lists yet), the manifest (the switch), then
    # the previous generation
    for entry in journal:
        _publish_shard(fs, local, staging, out_path, entry)
    _write_manifest(fs, local, manifest_url, manifest)
    _remove_stale_shards(fs, out_path, split, {s["name"] for s in shards})
    shutil.rmtree(staging.path, ignore_errors=True)
    return PackResult(manifest, out, encoded["count"])


def refuse_paths_outside(samples: list[RawSample], roots: list[str]) -> None:
    """A sample whose media path leaves the source tree (an id such as ``../../x`` or an
    absolute path in the annotations) gets a ``SampleError``: it is never read. Lexical
    (``normpath``), so symlinks inside the tree still work."""
    bases = [os.path.normpath(os.path.abspath(r)) for r in roots]

    def inside(p: str) -> bool:
        q = os.path.normpath(os.path.abspath(p))
        return any(q == b or q.startswith(b + os.sep) for b in bases)

    for s in samples:
        if s.error is not None:
            continue
        paths = list(s.frames) + ([s.audio.path] if s.audio else []) + \
            ([s.video] if s.video else [])
        for v in s.extra.values():
            paths += [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] \
                if isinstance(v, (list, tuple)) else []
        outside = [p for p in paths if not inside(p)]
        if outside:
            s.error = SampleError(s.key, outside[0], "the annotation's id leads outside the "
                                  f"source directory {roots[0]} (refused: ids must name files "
                                  "inside --src)")


def _make_output_dir(fs, out_path: str, out: str, local: bool) -> None:
    if local:
        if os.path.exists(out_path) and not os.path.isdir(out_path):
            raise PackError(f"--out {out} is a file, not a directory")
        try:
            os.makedirs(out_path, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise PackError(f"--out {out}: a component of the path is a file, not a "
                            "directory") from None
        except OSError as e:
            raise PackError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    else:
        with _writing(out):
            fs.makedirs(out_path, exist_ok=True)


def _existing_manifest(fs, url: str, overwrite: bool) -> dict | None:
    """The manifest a previous pack published at ``url`` (None if none); one that cannot be
    read is an error unless it is being overwritten."""
    try:
        return json.loads(storage.read_file(fs, url))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if overwrite:
            log.warning("replacing the unreadable manifest %s (%s)", url, e)
            return {}
        raise PackError(f"{url} exists but is not a readable manifest ({e}); pass --overwrite "
                        "to replace it") from None


def _encode_and_stage(dataset, src, opts, workers, staging, journal, todo, split, generation,
                      progress, stop_after):
    index = len(journal)
    cur = None  # (writer, file, tmp path, keys, size estimate)
    skipped_since: list[dict] = []
    count = 0

    def open_shard():
        tmp = os.path.join(staging.path, shard_name(split, index, generation) + ".partial")
        with _writing(tmp):
            f = open(tmp, "wb")
        return {"writer": DeterministicTarWriter(f), "file": f, "tmp": tmp, "keys": [], "size": 0,
                "spans": [], "sha": []}

    def close_shard():
        nonlocal cur, index, skipped_since
        name = shard_name(split, index, generation)
        with _writing(cur["tmp"]):
            nbytes, sha = cur["writer"].close()
            cur["file"].flush()
            os.fsync(cur["file"].fileno())
            cur["file"].close()
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
            with _writing(cur["tmp"]):
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
            with contextlib.suppress(OSError):
                cur["file"].close()
            with contextlib.suppress(OSError):
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


def _publish_shard(fs, local: bool, staging: Staging, out_path: str, entry: dict) -> None:
    """Make one staged shard visible at the output under its generation name (listed by no
    manifest until the new one is written)."""
    staged = os.path.join(staging.path, entry["name"])
    dest = storage.join(out_path, entry["name"])
    if not os.path.exists(staged):
        # published by an earlier, interrupted run (a local rename moves the file)
        if fs.exists(dest) and fs.size(dest) == entry["bytes"]:
            return
        raise DataPipelineError(f"staged shard {staged} is missing and {dest} does not match "
                                "its journal; delete the staging directory and pack again")
    with _writing(dest):
        if local:
            os.replace(staged, dest)  # atomic: visible only complete
        else:
            fs.put_file(staged, dest)  # one object, visible only when the upload completes


def _write_manifest(fs, local: bool, url: str, manifest: dict) -> None:
    """The switch from the previous pack to this one: one rename, or one object PUT."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    if local:
        _atomic_write(url, data)
    else:
        with _writing(url):
            fs.pipe_file(url, data)


def _remove_stale_shards(fs, out_path: str, split: str, keep: set[str]) -> None:
    """Shards of this split that the new manifest does not list: the previous generation
    (after --overwrite), and shards an abandoned pack published but never listed."""
    try:
        listing = fs.ls(out_path, detail=False)
    except OSError as e:
        log.warning("could not list %s to remove the previous pack's shards (%s)", out_path, e)
        return
    for p in listing:
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if is_shard_of(name, split) and name not in keep:
            log.info("removing shard %s of the previous pack", p)
            try:
                fs.rm_file(p)
            except OSError as e:  # the new pack is complete; the leftover is only unlisted bytes
                log.warning("could not remove %s (%s)", p, e)
