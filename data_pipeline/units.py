"""Byte sizes as people write them: ``256MB`` = 256,000,000 bytes, ``256MiB`` = 256 x 2^20.

One reading for the CLI (``--shard-size``) and the API (``PackOptions(shard_bytes="256MB")``),
so a pack started from either resumes from the other: decimal units (k/kB, M/MB, G/GB, T/TB)
are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024, case-insensitive.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'256MB' -> 256000000, '1GiB' -> 1073741824, '500k', 1048576 -> bytes; ValueError if not
    a size."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB = 256,000,000 bytes, 256MiB = "
                         "256 x 2^20, or a byte count)")
    return int(round(float(m.group(1)) * _UNITS[unit]))
