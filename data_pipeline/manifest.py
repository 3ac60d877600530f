"""Reading ``{split}.manifest.json`` (SCHEMA.md, "Manifest"): the one loader that verify,
inspect, the streaming ingest, the Ray Data path and the trainer use."""

from __future__ import annotations

import json

from data_pipeline import storage
from data_pipeline.errors import ManifestError, ShardError
from data_pipeline.schema import SCHEMA_VERSION, manifest_name

REQUIRED_FIELDS = ("dataset", "split", "segments", "options", "shards", "num_samples")


def load_manifest(url: str, split: str, storage_options: dict | None = None) -> dict:
    """``{split}.manifest.json`` at ``url``: the schema version, the fields every reader
    relies on and each shard's per-sample ``spans`` / ``sample_sha256`` checked. Raises
    ``ManifestError`` naming the manifest URL (and the field)."""
    fs, path = storage.filesystem(url, **(storage_options or {}))
    murl = storage.join(path, manifest_name(split))
    try:
        manifest = json.loads(fs.cat_file(murl))
    except FileNotFoundError:
        raise ManifestError(f"{url}: no manifest {manifest_name(split)} (is the split packed, "
                            "and finished? the manifest is written last)", murl) from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{murl}: not valid JSON ({e})", murl) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{murl}: schema_version {manifest.get('schema_version')!r} (this "
                            f"avmoe reads version {SCHEMA_VERSION})", murl, "schema_version")
    for fld in REQUIRED_FIELDS:
        if fld not in manifest:
            raise ManifestError(f"{murl}: manifest has no {fld!r} field", murl, fld)
    for s in manifest["shards"]:
        if "spans" not in s or "sample_sha256" not in s:
            raise ManifestError(f"{murl}: shard {s.get('name')!r} has no per-sample 'spans' / "
                                "'sample_sha256' (re-pack with this avmoe)", murl, "shards")
    return manifest


def manifest_splits(url: str) -> list[str]:
    """The splits that have a manifest at ``url`` (sorted)."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise ShardError(f"{url} does not exist")
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n[: -len(".manifest.json")] for n in names if n.endswith(".manifest.json"))
