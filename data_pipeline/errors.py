"""Errors that name what was wrong: the file, the sample key / video id, what was expected."""

from __future__ import annotations


class DataPipelineError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero."""


class PackError(DataPipelineError):
    """``pack`` cannot write the split: the output is not a directory, another pack holds its
    lock, the disk is full, ... The message names the file or URL; what was already staged is
    kept for the resume."""


class LayoutError(PackError):
    """The source directory is not the official raw layout (a missing or malformed
    annotation file, an unparseable row)."""


class SampleError(PackError):
    """One sample cannot be packed: a missing frame, short audio, unknown label, ..."""

    def __init__(self, key: str, path: str | None, problem: str):
        self.key, self.path, self.problem = key, path, problem
        where = f" ({path})" if path else ""
        super().__init__(f"sample {key!r}{where}: {problem}")

    def __reduce__(self):  # picklable across worker processes
        return (SampleError, (self.key, self.path, self.problem))


class ShardError(DataPipelineError):
    """A shard on storage does not match its manifest, or cannot be read."""


class MemberError(Exception):
    """One sample is bad: ``member`` (the member concerned, or None) and ``problem``. Raised
    while decoding a sample (not a ``DataPipelineError``: whoever reads the sample adds the
    shard and key and reports it its own way)."""

    def __init__(self, member: str | None, problem: str):
        self.member, self.problem = member, problem
        super().__init__(problem)

    def __reduce__(self):
        return (type(self), (self.member, self.problem))


class ManifestError(ShardError):
    """A split's manifest is missing, unreadable, of another schema version, or lacks a field
    (``url``: the manifest's URL; ``field``: the missing or wrong field, if one)."""

    def __init__(self, message: str, url: str | None = None, field: str | None = None):
        self.url, self.field = url, field
        super().__init__(message)

    def __reduce__(self):
        return (ManifestError, (str(self), self.url, self.field))


class IngestError(DataPipelineError):
    """A sample (or the split) cannot be read as its manifest describes."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None,
                 member: str | None = None):
        self.shard, self.key, self.member = shard, key, member
        super().__init__(message)

    def __reduce__(self):
        return (IngestError, (str(self), self.shard, self.key, self.member))


class UnknownDatasetError(DataPipelineError, KeyError):
    """A dataset name that no module of ``data_pipeline.datasets`` (nor a plug-in) registers.
    A ``KeyError`` too, like the other registries' lookups; its message is not quoted."""

    __str__ = Exception.__str__
