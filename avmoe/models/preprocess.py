"""On-device input preparation, so CPU workers ship uint8 frames and int16 audio (AVBatch).

Frames: (B, T, H, W, 3) uint8 (or float (B, T, 3, H, W) in [0, 1]) -> /255 -> bicubic resize
to the model's image size, skipped when the size already matches -> ImageNet mean/std ->
(B*T, 3, S, S). The resize (``visual.antialias``): antialiased and clamped to [0, 1] (close to
PIL's bicubic resize of the uint8 image, which filters over the shrunk support and saturates), or
plain bicubic interpolation (a = -0.75) with its overshoot kept, exactly what the official code
does (torchvision 0.14 ``Resize`` on the float tensor from ``read_image() / 255``: antialias
defaults to False for tensors there and only uint8 output is clamped; the AVS model's
``F.interpolate``; resizing before or after the normalisation is the same linear map).

Audio: (B, T*sps) int16 (/32768) or float -> (B*T, sps), one clip per segment.

Missing modality (paper Table 6): ``frames``/``audio`` None, or ``visual_present`` /
``audio_present`` False for a sample, feeds zeros for that sample *after* preparation: a
zero normalised image (the ImageNet-mean grey frame) and a silent waveform. The backbones and
adapters still run on those zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avmoe.batch import AVBatch


@dataclass
class ModelInputs:
    frames: torch.Tensor  # (B*T, 3, S, S) normalised
    audio: torch.Tensor  # (B*T, samples) float in [-1, 1]
    batch_size: int
    num_segments: int


class AVPreprocessor(nn.Module):
    def __init__(self, img_size: int, mean, std, segment_samples: int, antialias: bool = True):
        super().__init__()
        self.img_size, self.antialias = img_size, antialias
        self.segment_samples = segment_samples
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _segments(self, batch: AVBatch) -> int:
        if batch.frames is not None:
            return int(batch.frames.shape[1])
        if batch.audio is not None:
            n = batch.audio.shape[-1]
            if n % self.segment_samples:
                raise ValueError(f"audio length {n} is not a multiple of {self.segment_samples}")
            return n // self.segment_samples
        raise ValueError("a batch needs frames or audio (both are None)")

    def frames(self, x: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        dev = self.mean.device
        s = self.img_size
        if x is None:
            return torch.zeros(b * t, 3, s, s, device=dev)
        x = x.to(dev, non_blocking=True)
        is_uint8 = x.dtype == torch.uint8
        if is_uint8 or (x.shape[-1] == 3 and x.shape[2] != 3):
            x = x.permute(0, 1, 4, 2, 3)  # channels-last -> (B, T, 3, H, W)
        x = x.reshape(b * t, *x.shape[2:]).float()
        if is_uint8:
            x = x / 255.0
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=self.antialias)
            if self.antialias:
                x = x.clamp_(0, 1)
        return (x - self.mean) / self.std

    def audio(self, x: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        dev = self.mean.device
        if x is None:
            return torch.zeros(b * t, self.segment_samples, device=dev)
        x = x.to(dev, non_blocking=True)
        if x.shape[-1] != t * self.segment_samples:
            raise ValueError(f"audio has {x.shape[-1]} samples, expected T*{self.segment_samples} = "
                             f"{t * self.segment_samples}")
        x = x.float() / 32768.0 if x.dtype == torch.int16 else x.float()
        return x.reshape(b * t, self.segment_samples)

    @staticmethod
    def _mask(x: torch.Tensor, present: torch.Tensor | None, t: int) -> torch.Tensor:
        if present is None:
            return x
        keep = present.to(x.device, torch.bool).repeat_interleave(t)
        return x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def forward(self, batch: AVBatch) -> ModelInputs:
        b, t = batch.batch_size, self._segments(batch)
        frames = self._mask(self.frames(batch.frames, b, t), batch.visual_present, t)
        audio = self._mask(self.audio(batch.audio, b, t), batch.audio_present, t)
        return ModelInputs(frames, audio, b, t)

