"""Reading ``{split}.manifest.json`` (SCHEMA.md, "Manifest"): the one loader that verify,
inspect, the streaming ingest, the Ray Data path and the trainer use.

A manifest is input like any other: every field a reader relies on is checked here, before
anything is allocated or read from its numbers (``check_manifest``), and a bad one is a
``ManifestError`` naming the manifest, the field (``shards[3].spans[1]``) and what was
expected: shard names that are plain file names listed once, per-sample keys, spans and sha256
that agree with each other and with the shard's size, sizes within the schema's bounds.
"""

from __future__ import annotations

import json
import re

from data_pipeline import storage
from data_pipeline.errors import ManifestError, ShardError
from data_pipeline.schema import (MAX_FRAME_SIZE, MAX_MASK_SIZE, MAX_SEGMENTS, SCHEMA_VERSION,
                                  manifest_name)
from data_pipeline.tario import BLOCK

REQUIRED_FIELDS = ("dataset", "split", "segments", "options", "shards", "num_samples")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.tar")
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def load_manifest(url: str, split: str, storage_options: dict | None = None) -> dict:
    """``{split}.manifest.json`` at ``url``, checked (``check_manifest``). Raises
    ``ManifestError`` naming the manifest URL (and the field)."""
    fs, path = storage.filesystem(url, **(storage_options or {}))
    murl = storage.join(path, manifest_name(split))
    try:
        manifest = json.loads(storage.read_file(fs, murl))
    except FileNotFoundError:
        raise ManifestError(f"{url}: no manifest {manifest_name(split)} (is the split packed, "
                            "and finished? the manifest is written last)", murl) from None
    except IsADirectoryError as e:
        raise ManifestError(f"{murl}: cannot be read ({e})", murl) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{murl}: not valid JSON ({e})", murl) from None
    check_manifest(manifest, murl, split)
    return manifest


def _int(v) -> bool:
    return type(v) is int


def check_manifest(manifest, murl: str, split: str | None = None) -> None:
    """Raise ``ManifestError`` (naming ``murl`` and the field) unless ``manifest`` is one a
    reader can trust its numbers of."""
    def bad(fld: str, problem: str) -> ManifestError:
        return ManifestError(f"{murl}: field {fld!r} {problem}", murl, fld)

    if not isinstance(manifest, dict):
        raise ManifestError(f"{murl}: expected a JSON object, got {type(manifest).__name__}", murl)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{murl}: schema_version {manifest.get('schema_version')!r} (this "
                            f"avmoe reads version {SCHEMA_VERSION})", murl, "schema_version")
    for fld in REQUIRED_FIELDS:
        if fld not in manifest:
            raise ManifestError(f"{murl}: manifest has no {fld!r} field", murl, fld)
    if not isinstance(manifest["dataset"], str):
        raise bad("dataset", "must be a dataset name")
    if split is not None and manifest["split"] != split:
        raise bad("split", f"is {manifest['split']!r}, but the file is the {split!r} manifest")
    seg = manifest["segments"]
    if not _int(seg) or not 1 <= seg <= MAX_SEGMENTS:
        raise bad("segments", f"must be an integer in 1..{MAX_SEGMENTS}, got {seg!r}")
    opts = manifest["options"]
    if not isinstance(opts, dict):
        raise bad("options", "must be an object")
    for fld, top in (("frame_size", MAX_FRAME_SIZE), ("mask_size", MAX_MASK_SIZE)):
        v = opts.get(fld)
        if not _int(v) or not 1 <= v <= top:
            raise bad(f"options.{fld}", f"must be an integer in 1..{top}, got {v!r}")
    if opts.get("audio_format", "npy") not in ("npy", "flac"):
        raise bad("options.audio_format", f"must be npy or flac, got {opts['audio_format']!r}")
    if not isinstance(manifest.get("label_vocab", {}), dict):
        raise bad("label_vocab", "must be an object")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise bad("shards", "must be a non-empty list")
    names: dict[str, int] = {}
    keys: dict[str, str] = {}
    total = 0
    for i, sh in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(sh, dict):
            raise bad(where, "must be an object")
        name = sh.get("name")
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            raise bad(f"{where}.name", f"must be a plain .tar file name (no directories), got "
                      f"{name!r}")
        if name in names:
            raise bad(f"{where}.name", f"{name!r} is listed twice (also shards[{names[name]}])")
        names[name] = i
        if "spans" not in sh or "sample_sha256" not in sh:
            raise ManifestError(f"{murl}: shard {name!r} has no per-sample 'spans' / "
                                "'sample_sha256' (re-pack with this avmoe)", murl, "shards")
        n, size = sh.get("samples"), sh.get("bytes")
        if not _int(n) or n < 1:
            raise bad(f"{where}.samples", f"must be a positive integer, got {n!r}")
        if not _int(size) or size < 2 * BLOCK or size % BLOCK:
            raise bad(f"{where}.bytes", f"must be a tar size (a multiple of {BLOCK}), got {size!r}")
        if not isinstance(sh.get("sha256"), str) or not _SHA256.fullmatch(sh["sha256"]):
            raise bad(f"{where}.sha256", "must be 64 lowercase hex digits")
        for fld in ("keys", "spans", "sample_sha256"):
            if not isinstance(sh.get(fld), list) or len(sh[fld]) != n:
                got = len(sh[fld]) if isinstance(sh.get(fld), list) else "no list of"
                raise bad(f"{where}.{fld}", f"has {got} entries, but the manifest lists {n} "
                          "samples for this shard (one entry per sample)")
        end = 0
        for j, (key, span, sha) in enumerate(zip(sh["keys"], sh["spans"], sh["sample_sha256"])):
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise bad(f"{where}.keys[{j}]", f"must match [A-Za-z0-9_-]+, got {key!r}")
            if key in keys:
                raise bad(f"{where}.keys[{j}]", f"key {key!r} appears twice in the split (also in "
                          f"{keys[key]})")
            keys[key] = name
            if not (isinstance(span, list) and len(span) == 2 and all(map(_int, span))):
                raise bad(f"{where}.spans[{j}]", f"must be [offset, length], got {span!r}")
            off, length = span
            if off != end or length < 2 * BLOCK or length % BLOCK:
                raise bad(f"{where}.spans[{j}]", f"sample {key!r}: span {span!r} does not follow "
                          f"the previous sample (expected offset {end} and a positive length in "
                          f"whole {BLOCK}-byte blocks)")
            end = off + length
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise bad(f"{where}.sample_sha256[{j}]", f"sample {key!r}: must be 64 lowercase "
                          "hex digits")
        if end + 2 * BLOCK > size:
            raise bad(f"{where}.spans", f"the samples end at byte {end}, past the shard's "
                      f"{size} bytes (less its end-of-archive blocks)")
        total += n
    if manifest["num_samples"] != total:
        raise bad("num_samples", f"is {manifest['num_samples']!r}, but the shards list {total} "
                  "samples")


def manifest_splits(url: str) -> list[str]:
    """The splits that have a manifest at ``url`` (sorted)."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise ShardError(f"{url} does not exist")
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n[: -len(".manifest.json")] for n in names if n.endswith(".manifest.json"))
