"""``verify``: re-read published shards and check them against their manifests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

from data_pipeline import storage
from data_pipeline.decode import decode_member
from data_pipeline.errors import ShardError
from data_pipeline.schema import SCHEMA_VERSION, expected_members, manifest_name


class HashingReader(io.RawIOBase):
    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha256.update(data)
        self.bytes += n
        return n


def iter_tar_samples(fileobj, shard: str, offsets: list[int] | None = None):
    """(key, {suffix: bytes}) per sample, in tar order; raises ShardError on a truncated or
    malformed tar and on a key whose members are not contiguous. ``offsets``, if given,
    receives the byte offset of each sample's first header."""
    seen: set[str] = set()
    key, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    raise ShardError(f"{shard}: member {info.name!r} has no suffix")
                k, suffix = base.split(".", 1)
                if k != key:
                    if key is not None:
                        yield key, members
                    if k in seen:
                        raise ShardError(f"{shard}: key {k!r} appears again after other keys "
                                         "(members must be contiguous)")
                    seen.add(k)
                    key, members = k, {}
                    if offsets is not None:
                        offsets.append(info.offset)
                if suffix in members:
                    raise ShardError(f"{shard}: key {k!r} has member {suffix!r} twice")
                members[suffix] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise ShardError(f"{shard}: truncated or malformed tar after key {key!r} ({e})") from None
    if key is not None:
        yield key, members


@dataclass
class VerifyReport:
    splits: dict[str, int] = field(default_factory=dict)  # split -> samples checked
    shards: int = 0
    bytes: int = 0


def load_manifest(url: str, split: str, storage_options: dict | None = None) -> dict:
    """``{split}.manifest.json`` at ``url``, schema version checked (the streaming ingest adds
    its own field checks on top: ``data_pipeline.ingest.load_manifest``)."""
    fs, path = storage.filesystem(url, **(storage_options or {}))
    murl = storage.join(path, manifest_name(split))
    try:
        manifest = json.loads(fs.cat_file(murl))
    except FileNotFoundError:
        raise ShardError(f"{url}: no manifest {manifest_name(split)} (is the split packed, and "
                         "finished? the manifest is written last)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{murl}: not valid JSON ({e})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{murl}: schema_version {manifest.get('schema_version')!r} (this "
                         f"avmoe reads version {SCHEMA_VERSION})")
    return manifest


def manifest_splits(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise ShardError(f"{url} does not exist")
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n[: -len(".manifest.json")] for n in names if n.endswith(".manifest.json"))


def verify(url: str, splits: list[str] | None = None, decode: bool = True) -> VerifyReport:
    fs, path = storage.filesystem(url)
    splits = splits or manifest_splits(url)
    if not splits:
        raise ShardError(f"{url}: no *.manifest.json found (was the pack finished?)")
    report = VerifyReport()
    for split in splits:
        manifest = load_manifest(url, split)
        audio_format = manifest["options"]["audio_format"]
        count = 0
        for entry in manifest["shards"]:
            shard = storage.join(path, entry["name"])
            if not fs.exists(shard):
                raise ShardError(f"{shard}: listed in the manifest but missing")
            with fs.open(shard, "rb") as f:
                reader = HashingReader(f)
                keys, offsets = [], []
                for key, members in iter_tar_samples(io.BufferedReader(reader, 1 << 20), shard,
                                                     offsets):
                    keys.append(key)
                    check_sample(shard, key, members, manifest["dataset"], audio_format, decode)
                while reader.read(1 << 20):  # hash the end-of-archive padding too
                    pass
            if reader.bytes != entry["bytes"]:
                raise ShardError(f"{shard}: {reader.bytes} bytes, manifest says {entry['bytes']}")
            if reader.sha256.hexdigest() != entry["sha256"]:
                raise ShardError(f"{shard}: sha256 mismatch (manifest {entry['sha256'][:12]}..., "
                                 f"file {reader.sha256.hexdigest()[:12]}...)")
            if keys != entry["keys"] or len(keys) != entry["samples"]:
                raise ShardError(f"{shard}: holds {len(keys)} samples, manifest lists "
                                 f"{entry['samples']} (keys differ)")
            spans = entry.get("spans", [])
            if [o for o, _ in spans] != offsets or any(
                    a[0] + a[1] != b[0] for a, b in zip(spans, spans[1:])):
                raise ShardError(f"{shard}: sample byte spans in the manifest do not match the tar")
            count += len(keys)
            report.shards += 1
            report.bytes += reader.bytes
        if count != manifest["num_samples"]:
            raise ShardError(f"{url} {split}: {count} samples, manifest says "
                             f"{manifest['num_samples']}")
        report.splits[split] = count
    return report


def check_sample(shard: str, key: str, members: dict, dataset: str, audio_format: str,
                 decode: bool = True) -> None:
    try:
        labels = json.loads(members["json"])
    except KeyError:
        raise ShardError(f"{shard}: sample {key!r} has no 'json' member") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{shard}: sample {key!r} member 'json' is not valid JSON ({e})") from None
    want = expected_members(dataset, labels, audio_format)
    if sorted(members) != want:
        missing = sorted(set(want) - set(members))
        extra = sorted(set(members) - set(want))
        raise ShardError(f"{shard}: sample {key!r} members differ from the schema: missing "
                         f"{missing}, unexpected {extra}")
    if decode:
        for suffix, data in members.items():
            try:
                decode_member(suffix, data)
            except Exception as e:
                raise ShardError(f"{shard}: sample {key!r} member {suffix!r} does not decode "
                                 f"({type(e).__name__}: {e})") from None
