"""The shard sample schema (see SCHEMA.md, which documents this module's constants).

A sample is one video (one question for AVQA) stored as contiguous tar members
``<key>.<suffix>``; the key holds no dot, so every reader (webdataset, Ray, DALI) groups the
members the same way. Every sample has the generic members below (frames, audio, labels);
a dataset adds its own (``Dataset.extra_members`` in ``data_pipeline/datasets/``).
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1

SAMPLE_RATE = 32000
DEFAULT_FRAME_SIZE = 192  # the model's input size: no resize on the training device
DEFAULT_MASK_SIZE = 224  # AVSBench ground-truth resolution (metrics are computed there)
DEFAULT_JPEG_QUALITY = 90
DEFAULT_SHARD_BYTES = 256_000_000  # "256MB" (data_pipeline.units: MB = 10^6 bytes, MiB = 2^20)

# Bounds every reader checks a manifest against (and pack refuses to exceed): a hostile or
# corrupt manifest must not make a decode task allocate frames/audio of absurd size.
MAX_SEGMENTS = 256
MAX_FRAME_SIZE = 1024
MAX_MASK_SIZE = 1024
# Source images above this many pixels are refused before they are decoded (decompression
# bombs: a small PNG/JPEG header can announce gigapixels). 8192 x 8192; a 4K frame is 8.3 M.
MAX_IMAGE_PIXELS = 8192 * 8192

LABELS_MEMBER = "json"
AUDIO_NPY_MEMBER = "audio.npy"
AUDIO_FLAC_MEMBER = "audio.flac"


def frame_member(t: int) -> str:
    return f"f{t:02d}.jpg"


def mask_member(t: int) -> str:
    return f"m{t:02d}.png"


# Suffixes that may never appear in a shard (pickle in any spelling webdataset knows).
FORBIDDEN_SUFFIXES = ("pyd", "pickle", "pkl", "pth", "pt", "mp")


def sanitize_key(raw: str) -> str:
    """A tar-safe sample key: characters outside [A-Za-z0-9_-] become '-'.

    The original id is kept in the labels json; collisions are detected by the packer.
    """
    return re.sub(r"[^A-Za-z0-9_-]", "-", raw)


def shard_name(split: str, index: int, generation: str) -> str:
    """``{split}-{generation}-{index:06d}.tar``. ``generation`` (from the pack's fingerprint)
    differs for every input/options, so a new pack's shards never replace an older pack's
    bytes under a name the older manifest lists: publishing a split is one switch, the manifest
    (see ``data_pipeline.pack``)."""
    return f"{split}-{generation}-{index:06d}.tar"


def is_shard_of(name: str, split: str) -> bool:
    """Whether ``name`` is a shard file of ``split`` (this scheme, or the older
    ``{split}-{index:06d}.tar``)."""
    return re.fullmatch(re.escape(split) + r"-(?:[0-9a-f]{12}-)?\d{6}\.tar", name) is not None


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"
