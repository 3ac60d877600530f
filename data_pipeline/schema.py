"""The shard sample schema (see SCHEMA.md, which documents this module's constants).

A sample is one video (one question for AVQA) stored as contiguous tar members
``<key>.<suffix>``; the key holds no dot, so every reader (webdataset, Ray, DALI) groups the
members the same way.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1

SAMPLE_RATE = 32000
DEFAULT_FRAME_SIZE = 192  # the model's input size: no resize on the training device
DEFAULT_MASK_SIZE = 224  # AVSBench ground-truth resolution (metrics are computed there)
DEFAULT_JPEG_QUALITY = 90
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024

DATASETS = ("ave", "avvp", "avs-s4", "avs-ms3", "avqa")
TASK_OF_DATASET = {"ave": "ave", "avvp": "avvp", "avs-s4": "avs", "avs-ms3": "avs", "avqa": "avqa"}
SEGMENTS = {"ave": 10, "avvp": 10, "avs-s4": 5, "avs-ms3": 5, "avqa": 10}

LABELS_MEMBER = "json"
AUDIO_NPY_MEMBER = "audio.npy"
AUDIO_FLAC_MEMBER = "audio.flac"
FEATURES_MEMBER = "r2p1d.npy"  # AVVP R(2+1)D-18 clip features, (T, 512) float32


def frame_member(t: int) -> str:
    return f"f{t:02d}.jpg"


def mask_member(t: int) -> str:
    return f"m{t:02d}.png"


FRAME_RE = re.compile(r"^f(\d{2})\.jpg$")
MASK_RE = re.compile(r"^m(\d{2})\.png$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
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


def expected_members(dataset: str, labels: dict, audio_format: str = "npy") -> list[str]:
    """The members a complete sample of ``dataset`` has (sorted as written)."""
    t = SEGMENTS[dataset]
    names = [frame_member(i) for i in range(t)]
    names.append(AUDIO_FLAC_MEMBER if audio_format == "flac" else AUDIO_NPY_MEMBER)
    names.append(LABELS_MEMBER)
    if dataset == "avvp":
        names.append(FEATURES_MEMBER)
    if dataset.startswith("avs"):
        names += [mask_member(i) for i in range(int(labels["num_masks"]))]
    return sorted(names)
