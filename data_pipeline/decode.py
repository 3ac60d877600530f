"""Decoding shard members (shared by verify, inspect and the streaming ingest).

A member is checked against what its header announces before anything is allocated from it:
a ``.npy`` header whose shape needs more bytes than the member holds, a JPEG/PNG larger than
``MAX_IMAGE_PIXELS`` (decompression bombs), a FLAC longer than the caller expects are errors,
not allocations."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from data_pipeline.schema import FORBIDDEN_SUFFIXES, MAX_IMAGE_PIXELS

try:  # libjpeg-turbo without Pillow's per-call overhead (2-3x faster on small frames)
    import simplejpeg
except ImportError:  # pragma: no cover - optional
    simplejpeg = None


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} announces {width}x{height} pixels, more than the limit of "
                         f"{MAX_IMAGE_PIXELS:,} (decompression bomb?)")


def decode_jpeg(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    if simplejpeg is not None:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        _check_pixels(w, h, "JPEG")
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    img = Image.open(io.BytesIO(data))
    _check_pixels(*img.size, "JPEG")
    return np.asarray(img.convert("RGB"))


def decode_png_mask(data: bytes, size: int | None = None) -> np.ndarray:
    """(H, W) uint8 in {0, 1}; ``size``: the expected square size, checked from the header
    before decoding."""
    img = Image.open(io.BytesIO(data))
    if size is not None and img.size != (size, size):
        raise ValueError(f"mask is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    _check_pixels(*img.size, "PNG")
    return (np.asarray(img.convert("L")) > 0).astype(np.uint8)


def decode_npy(data: bytes) -> np.ndarray:
    """A plain array (never a pickle); the header's shape must fit the bytes that follow it."""
    buf = io.BytesIO(data)
    fmt = np.lib.format
    version = fmt.read_magic(buf)
    read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f".npy format version {version} is not supported")
    shape, _, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not allowed")
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(data) - buf.tell()
    if need != have:
        raise ValueError(f"header announces shape {shape} {dtype} ({need:,} bytes), the member "
                         f"holds {have:,}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_flac(data: bytes, max_samples: int | None = None) -> np.ndarray:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        if max_samples is not None and f.frames * f.channels > max_samples:
            raise ValueError(f"FLAC announces {f.frames:,} frames x {f.channels} channels, more "
                             f"than the {max_samples:,} samples expected")
        return f.read(dtype="int16")


def decode_member(suffix: str, data: bytes):
    """Decode one member by its suffix; raises ValueError for a forbidden or unknown kind."""
    ext = suffix.rsplit(".", 1)[-1]
    if ext in FORBIDDEN_SUFFIXES:
        raise ValueError(f"member kind .{ext} (pickle) is not allowed in avmoe shards")
    if ext == "jpg":
        return decode_jpeg(data)
    if ext == "png":
        return decode_png_mask(data)
    if ext == "npy":
        return decode_npy(data)
    if ext == "flac":
        return decode_flac(data)
    if ext == "json":
        return json.loads(data)
    raise ValueError(f"unknown member kind .{ext}")
