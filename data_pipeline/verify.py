"""``verify``: re-read published shards and check them against their manifests, with the
streaming ingest's own per-sample path.

A split is checked as training will read it: its manifest through ``load_manifest`` (shard
names listed once, keys, spans, sizes; ``data_pipeline.manifest``), then every shard read once
from start to end: each sample's span hashed against its manifest sha256 and decoded by the
ingest's decoder (``decode_task.SampleDecoder``: tar members, member schema, JPEG frames at
the manifest's frame size, int16 audio of the right length, masks, features, labels through
the dataset's target encoder), the end-of-archive padding, the shard's size and sha256. So a
shard that verifies is one the ingest accepts, and what the ingest would reject fails here
with a ``ShardError`` naming the shard, the key and the member.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from data_pipeline import storage
from data_pipeline.datasets import get_dataset
from data_pipeline.decode_task import SampleDecoder, check_span
from data_pipeline.errors import ManifestError, MemberError, ShardError
from data_pipeline.manifest import load_manifest, manifest_splits
from data_pipeline.sample import SampleSpec, empty_columns
from data_pipeline.tario import parse_members


@dataclass
class VerifyReport:
    splits: dict[str, int] = field(default_factory=dict)  # split -> samples checked
    shards: int = 0
    bytes: int = 0


def verify(url: str, splits: list[str] | None = None, decode: bool = True) -> VerifyReport:
    """Check every shard of ``splits`` (default: every split with a manifest) at ``url``;
    ``decode=False`` checks hashes, sizes and tar structure but decodes no media."""
    fs, path = storage.filesystem(url)
    splits = splits or manifest_splits(url)
    if not splits:
        raise ShardError(f"{url}: no *.manifest.json found (was the pack finished?)")
    report = VerifyReport()
    for split in splits:
        manifest = load_manifest(url, split)
        dataset = get_dataset(manifest["dataset"])
        try:
            spec = SampleSpec.from_manifest(manifest, dataset)
        except ManifestError as e:
            raise ManifestError(f"{url} {split}.manifest.json: {e}", url, e.field) from None
        decoder = SampleDecoder(spec, dataset)
        cols = empty_columns(spec, 1, dataset)
        for entry in manifest["shards"]:
            shard = storage.join(path, entry["name"])
            report.bytes += _verify_shard(fs, shard, entry, decoder, cols, decode)
            report.shards += 1
        report.splits[split] = manifest["num_samples"]
    return report


def _verify_shard(fs, shard: str, entry: dict, decoder: SampleDecoder, cols: dict,
                  decode: bool) -> int:
    if storage.is_local_fs(fs):
        problem = storage.not_a_regular_file(shard)
        if problem:
            raise ShardError(f"{shard}: {problem}")
    try:
        f = fs.open(shard, "rb")
    except FileNotFoundError:
        raise ShardError(f"{shard}: listed in the manifest but missing") from None
    whole = hashlib.sha256()
    with f:
        for key, (offset, length), sha in zip(entry["keys"], entry["spans"],
                                              entry["sample_sha256"]):
            span = f.read(length)
            whole.update(span)
            if len(span) < length:
                raise ShardError(f"{shard}: truncated: sample {key!r} ends at byte "
                                 f"{offset + length}, the file has {offset + len(span)}")
            try:
                check_span(span, sha)
                if decode:
                    decoder.decode_into(memoryview(span), key, cols, 0)
                else:
                    decoder.check_members(parse_members(memoryview(span), key))
            except MemberError as e:
                member = f" member {e.member!r}" if e.member else ""
                raise ShardError(f"{shard}: sample {key!r}{member}: {e.problem}") from None
        tail = f.read()
    whole.update(tail)
    size = entry["spans"][-1][0] + entry["spans"][-1][1] + len(tail)
    if tail.strip(b"\0"):
        raise ShardError(f"{shard}: bytes after the last sample that are not the tar's "
                         "end-of-archive padding (the manifest's spans do not cover the tar)")
    if size != entry["bytes"]:
        raise ShardError(f"{shard}: {size} bytes, manifest says {entry['bytes']}")
    if whole.hexdigest() != entry["sha256"]:
        raise ShardError(f"{shard}: sha256 mismatch (manifest {entry['sha256'][:12]}..., "
                         f"file {whole.hexdigest()[:12]}...)")
    return size
