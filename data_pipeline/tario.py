"""Tar shards: the deterministic writer and the two readers.

Writing: fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644),
members in the order given, so the same samples give byte-identical shards.

The writer lays out the archive itself (header blocks from ``tarfile.TarInfo.tobuf``, data
padded to 512 bytes, two zero blocks and padding to a 10240-byte record at the end: what
``tarfile`` writes), so it knows each sample's byte span and sha256. The manifest records
them: readers fetch one sample range with a ranged read and check it without hashing the
whole shard.

Reading: ``parse_members`` splits one sample span (a ranged read) into its members, zero-copy;
``iter_tar_samples`` streams a whole shard sample by sample. Both raise ``TarReadError``, which
each caller turns into its own error (a bad sample of the ingest, a ``ShardError`` of verify).
"""

from __future__ import annotations

import hashlib
import io
import tarfile

from data_pipeline.errors import MemberError
from data_pipeline.schema import FORBIDDEN_SUFFIXES

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


# ------------------------------------------------------------------------------ reading
_ZERO_BLOCK = bytes(BLOCK)
_SPECIAL_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                  tarfile.GNUTYPE_LONGLINK, tarfile.SOLARIS_XHDTYPE)


class TarReadError(MemberError):
    """A tar, or one sample's span of it, does not parse: ``member`` (the suffix or member
    name concerned, or None) and ``problem``. The streaming ingest reports it as a bad
    sample like any ``MemberError``; verify and inspect turn it into a ``ShardError``."""


def parse_members(buf: memoryview, key: str) -> dict[str, memoryview]:
    """Members ``{suffix: bytes}`` of one sample span (zero-copy views). The packer writes
    plain ustar headers; anything else (pax/GNU extension headers) is parsed by ``tarfile``."""
    members: dict[str, memoryview] = {}
    pos, n = 0, len(buf)
    while pos < n:
        hdr = bytes(buf[pos:pos + 512])
        if len(hdr) < 512:
            raise TarReadError(None, f"span ends inside a tar header at byte {pos}")
        if hdr == _ZERO_BLOCK:
            raise TarReadError(None, f"end-of-archive block inside the sample span at byte {pos}")
        name, size, kind = _ustar_header(hdr, pos)
        if kind in _SPECIAL_TYPES or size < 0:
            return _parse_with_tarfile(buf, key)
        data = buf[pos + 512:pos + 512 + size]
        if len(data) < size:
            raise TarReadError(name, f"member data truncated ({len(data)} of {size} bytes)")
        pos += 512 + -(-size // 512) * 512
        if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
            _add_member(members, name, data, key)
    return members


def _ustar_header(hdr: bytes, pos: int) -> tuple[str, int, bytes]:
    """(name, size, type) of a ustar header, checksum verified. ~5x cheaper than
    ``TarInfo.frombuf``, which parses every field; size -1 = a base-256 size (let tarfile do
    it)."""
    try:
        chksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarReadError(None, f"malformed tar header at byte {pos} of the span (checksum field "
                           f"{hdr[148:156]!r})") from None
    if chksum != 256 + sum(hdr[:148]) + sum(hdr[156:]):
        raise TarReadError(None, f"malformed tar header at byte {pos} of the span (bad checksum)")
    raw_size = hdr[124:136]
    if raw_size[0] & 0x80:
        return "", -1, hdr[156:157]
    try:
        size = int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarReadError(None, f"malformed tar header at byte {pos} of the span (size field "
                           f"{raw_size!r})") from None
    name = hdr[:100].split(b"\0", 1)[0]
    prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, hdr[156:157]


def _parse_with_tarfile(buf: memoryview, key: str) -> dict[str, memoryview]:
    members: dict[str, memoryview] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    _add_member(members, info.name, memoryview(tar.extractfile(info).read()), key)
    except tarfile.TarError as e:
        raise TarReadError(None, f"malformed tar ({e})") from None
    return members


def _add_member(members: dict, name: str, data: memoryview, key: str) -> None:
    base = name.rsplit("/", 1)[-1]
    k, _, suffix = base.partition(".")
    if k != key or not suffix:
        raise TarReadError(name, f"member {name!r} in the span of key {key!r} (keys must be "
                           "contiguous; the manifest span does not match the tar)")
    if suffix.rsplit(".", 1)[-1] in FORBIDDEN_SUFFIXES:
        raise TarReadError(suffix, "pickle members are not allowed in avmoe shards")
    if suffix in members:
        raise TarReadError(suffix, "member appears twice")
    members[suffix] = data


def iter_tar_samples(fileobj, shard: str, offsets: list[int] | None = None):
    """(key, {suffix: bytes}) per sample, in tar order; raises TarReadError on a truncated
    or malformed tar and on a key whose members are not contiguous. ``offsets``, if given,
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
                    raise TarReadError(None, f"{shard}: member {info.name!r} has no suffix")
                k, suffix = base.split(".", 1)
                if k != key:
                    if key is not None:
                        yield key, members
                    if k in seen:
                        raise TarReadError(None, f"{shard}: key {k!r} appears again after "
                                           "other keys (members must be contiguous)")
                    seen.add(k)
                    key, members = k, {}
                    if offsets is not None:
                        offsets.append(info.offset)
                if suffix in members:
                    raise TarReadError(None, f"{shard}: key {k!r} has member {suffix!r} twice")
                members[suffix] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise TarReadError(None, f"{shard}: truncated or malformed tar after key {key!r} "
                           f"({e})") from None
    if key is not None:
        yield key, members
