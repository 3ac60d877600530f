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
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024

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


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"
