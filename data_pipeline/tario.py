"""Deterministic tar writing: fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644),
members in the order given, so the same samples give byte-identical shards."""

from __future__ import annotations

import hashlib
import io
import tarfile

BLOCK = 512


def member_size(data_len: int) -> int:
    """Bytes a regular member takes in a tar: one header block plus padded data."""
    return BLOCK + -(-data_len // BLOCK) * BLOCK


def sample_size(members: list[tuple[str, bytes]], key: str) -> int:
    return sum(member_size(len(data)) for _, data in members)


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes (sha256) and counts what passes through."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._f.write(b)
        self.sha256.update(b)
        self.bytes += len(b)
        return len(b)


class DeterministicTarWriter:
    def __init__(self, fileobj):
        self._hash = HashingWriter(fileobj)
        self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        # Contiguous and sorted: Ray's streaming group-by silently corrupts interleaved keys.
        for suffix, data in sorted(members):
            self.add(f"{key}.{suffix}", data)

    def abort(self) -> None:
        """Drop an unfinished shard without writing the end-of-archive blocks."""
        self._tar.fileobj.closed = True  # tarfile's stream would flush on garbage collection
        self._tar.closed = True

    def close(self) -> tuple[int, str]:
        self._tar.close()
        return self._hash.bytes, self._hash.sha256.hexdigest()
