"""Deterministic tar writing: fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644),
members in the order given, so the same samples give byte-identical shards.

The writer lays out the archive itself (header blocks from ``tarfile.TarInfo.tobuf``, data
padded to 512 bytes, two zero blocks and padding to a 10240-byte record at the end: what
``tarfile`` writes), so it knows each sample's byte span and sha256. The manifest records
them: readers fetch one sample range with a ranged read and check it without hashing the
whole shard.
"""

from __future__ import annotations

import hashlib
import tarfile

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile.RECORDSIZE


def member_size(data_len: int) -> int:
    """Bytes a regular member with a short ASCII name takes: one header plus padded data."""
    return BLOCK + -(-data_len // BLOCK) * BLOCK


def sample_size(members: list[tuple[str, bytes]], key: str) -> int:
    return sum(member_size(len(data)) for _, data in members)


def member_bytes(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + b"\0" * (-len(data) % BLOCK)


class DeterministicTarWriter:
    def __init__(self, fileobj):
        self._f = fileobj
        self._sha = hashlib.sha256()
        self.bytes = 0

    def _write(self, buf: bytes) -> None:
        self._f.write(buf)
        self._sha.update(buf)
        self.bytes += len(buf)

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> tuple[int, int, str]:
        """Write one sample; returns its (offset, length, sha256) in the shard.

        Members are contiguous and sorted: Ray's streaming group-by silently corrupts
        interleaved keys."""
        buf = b"".join(member_bytes(f"{key}.{suffix}", data) for suffix, data in sorted(members))
        offset = self.bytes
        self._write(buf)
        return offset, len(buf), hashlib.sha256(buf).hexdigest()

    def close(self) -> tuple[int, str]:
        end = b"\0" * (2 * BLOCK)
        total = self.bytes + len(end)
        self._write(end + b"\0" * (-total % RECORD))
        return self.bytes, self._sha.hexdigest()
