"""The typed batch every model takes (produced by the streaming ingest, or built by hand).

Frames and audio arrive as the shards store them -- ``uint8`` frames and ``int16`` audio --
and the model does resize / normalise / mel on its own device (a GPU when there is one), so
CPU decode workers never touch floats (../shared/spec/anchors.md §6.1).

A missing modality (paper Table 6) is either ``None`` or a ``False`` entry in
``visual_present`` / ``audio_present``; the model then feeds zeros for that sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class AVBatch:
    """One batch of B videos (or B questions for AVQA), T one-second segments each.

    frames:  (B, T, H, W, 3) uint8 RGB, or already-float (B, T, 3, H, W) in [0, 1].
    audio:   (B, T * SAMPLE_RATE) int16 or float32 in [-1, 1], mono
             (``data_pipeline.schema.SAMPLE_RATE``, 32 kHz).
    targets: the dataset's labels, all tensors with leading batch dim B; their names, shapes
             and dtypes are defined by the dataset (``Dataset.target_shapes`` in
             ``data_pipeline/datasets/<name>.py``).
    keys: sample keys (video id, or ``<video_id>_q<question_id>`` for AVQA).
    """

    frames: torch.Tensor | None
    audio: torch.Tensor | None
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    visual_present: torch.Tensor | None = None  # (B,) bool; None = all present
    audio_present: torch.Tensor | None = None  # (B,) bool; None = all present
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        for t in (self.frames, self.audio):
            if t is not None:
                return int(t.shape[0])
        for t in self.targets.values():
            return int(t.shape[0])
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "AVBatch":
        def mv(x):
            return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x

        return AVBatch(
            frames=mv(self.frames),
            audio=mv(self.audio),
            targets={k: mv(v) for k, v in self.targets.items()},
            keys=list(self.keys),
            visual_present=mv(self.visual_present),
            audio_present=mv(self.audio_present),
            meta=dict(self.meta),
        )

    def drop(self, modality: str) -> "AVBatch":
        """The same batch with one modality marked absent (for --eval-drop)."""
        if modality not in ("audio", "visual"):
            raise ValueError(f"modality must be 'audio' or 'visual', got {modality!r}")
        b = self.batch_size
        absent = torch.zeros(b, dtype=torch.bool)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["audio_present" if modality == "audio" else "visual_present"] = absent
        return AVBatch(**kw)
