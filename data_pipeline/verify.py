"""``verify``: re-read published shards and check them against their manifests."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

from data_pipeline import storage
from data_pipeline.datasets import Dataset, get_dataset
from data_pipeline.decode import decode_member
from data_pipeline.errors import ShardError
from data_pipeline.manifest import load_manifest, manifest_splits
from data_pipeline.tario import TarReadError, iter_tar_samples


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


@dataclass
class VerifyReport:
    splits: dict[str, int] = field(default_factory=dict)  # split -> samples checked
    shards: int = 0
    bytes: int = 0


def verify(url: str, splits: list[str] | None = None, decode: bool = True) -> VerifyReport:
    fs, path = storage.filesystem(url)
    splits = splits or manifest_splits(url)
    if not splits:
        raise ShardError(f"{url}: no *.manifest.json found (was the pack finished?)")
    report = VerifyReport()
    for split in splits:
        manifest = load_manifest(url, split)
        dataset = get_dataset(manifest["dataset"])
        audio_format = manifest["options"]["audio_format"]
        count = 0
        for entry in manifest["shards"]:
            shard = storage.join(path, entry["name"])
            if not fs.exists(shard):
                raise ShardError(f"{shard}: listed in the manifest but missing")
            with fs.open(shard, "rb") as f:
                reader = HashingReader(f)
                keys, offsets = [], []
                try:
                    for key, members in iter_tar_samples(io.BufferedReader(reader, 1 << 20),
                                                         shard, offsets):
                        keys.append(key)
                        check_sample(shard, key, members, dataset, audio_format, decode)
                except TarReadError as e:
                    raise ShardError(str(e)) from None
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


def check_sample(shard: str, key: str, members: dict, dataset: Dataset, audio_format: str,
                 decode: bool = True) -> None:
    try:
        labels = json.loads(members["json"])
    except KeyError:
        raise ShardError(f"{shard}: sample {key!r} has no 'json' member") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{shard}: sample {key!r} member 'json' is not valid JSON ({e})") from None
    want = dataset.members(labels, audio_format)
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
