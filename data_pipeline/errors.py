"""Errors that name what was wrong: the file, the sample key / video id, what was expected."""

from __future__ import annotations


class DataPipelineError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero."""


class LayoutError(DataPipelineError):
    """The source directory is not the official raw layout (a missing or malformed
    annotation file, an unparseable row)."""


class SampleError(DataPipelineError):
    """One sample cannot be packed: a missing frame, short audio, unknown label, ..."""

    def __init__(self, key: str, path: str | None, problem: str):
        self.key, self.path, self.problem = key, path, problem
        where = f" ({path})" if path else ""
        super().__init__(f"sample {key!r}{where}: {problem}")

    def __reduce__(self):  # picklable across worker processes
        return (SampleError, (self.key, self.path, self.problem))


class ShardError(DataPipelineError):
    """A shard on storage does not match its manifest, or cannot be read."""
