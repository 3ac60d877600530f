"""HTS-AT's audio front-end in torch/torchaudio: waveform -> folded log-mel "image" (spec §1.1).

Per 1-s clip at 32 kHz: STFT (Hann 1024, hop 320, centred, reflect pad) -> power -> 64 Slaney
mel bins (50 Hz - 14 kHz, librosa's default filterbank, as torchlibrosa) -> 10 log10(max(x,
1e-10)) -> ``bn0`` over mel bins -> [SpecAugment, mixup: training only, off by default] ->
bicubic (align_corners) time interpolation 101 -> 1024 frames -> fold 1024x64 into 256x256 by
stacking 4 time chunks along frequency (HTS-AT ``reshape_wav2img``).

The mel matrix is recomputed from the config, not read from torchlibrosa; when an official
checkpoint carries ``logmel_extractor.melW`` the HTS-AT loader copies it in, so the filterbank
is bit-identical to the checkpoint's. The STFT kernels in the checkpoint (a DFT basis) are not
needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from avmoe.config import AudioConfig


def _mel_filterbank(cfg: AudioConfig) -> torch.Tensor:
    # computed on CPU even when the model is built on the meta device (torchaudio indexes
    # with boolean masks, which the meta backend cannot do)
    with torch.device("cpu"):
        fb = torchaudio.functional.melscale_fbanks(
            cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate,
            norm="slaney", mel_scale="slaney",
        )
    return fb.to(torch.get_default_device())


def _drop_stripes(x: torch.Tensor, dim: int, max_width: int, stripes: int) -> torch.Tensor:
    """torchlibrosa DropStripes: per clip, ``stripes`` bands of width U{0..max_width-1} set to 0."""
    n, size = x.shape[0], x.shape[dim]
    keep = torch.ones(n, size, device=x.device, dtype=torch.bool)
    pos = torch.arange(size, device=x.device)
    for _ in range(stripes):
        width = torch.randint(0, max(max_width, 1), (n, 1), device=x.device)
        start = (torch.rand(n, 1, device=x.device) * (size - width).clamp(min=1)).long()
        keep &= ~((pos >= start) & (pos < start + width))
    shape = [n] + [1] * (x.dim() - 1)
    shape[dim] = size
    return x * keep.view(shape).to(x.dtype)


class HTSATFrontend(nn.Module):
    """(N, samples) waveforms in [-1, 1] -> (N, 1, spec_size, spec_size)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("mel_fb", _mel_filterbank(cfg), persistent=False)  # (F, M)
        self.bn0 = nn.BatchNorm2d(cfg.n_mels)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(N, S) -> (N, 1, frames, n_mels) log-mel, before bn0."""
        spec = torch.stft(
            wave.float(), self.cfg.n_fft, hop_length=self.cfg.hop_length, win_length=self.cfg.n_fft,
            window=self.window, center=True, pad_mode="reflect", return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # (N, F, frames)
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb)  # (N, frames, M)
        return (10.0 * torch.log10(mel.clamp(min=1e-10))).unsqueeze(1)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """HTS-AT reshape_wav2img: (N, 1, T, F) -> (N, 1, spec, spec)."""
        r, s = self.cfg.freq_ratio, self.cfg.spec_size
        target_t, target_f = s * r, s // r
        if x.shape[2] > target_t:  # HTS-AT crops longer inputs; 1-s clips never are
            x = x[:, :, :target_t]
        if x.shape[2] < target_t:
            x = F.interpolate(x, (target_t, x.shape[3]), mode="bicubic", align_corners=True)
        if x.shape[3] < target_f:
            x = F.interpolate(x, (x.shape[2], target_f), mode="bicubic", align_corners=True)
        n, c, t, f = x.shape
        x = x.permute(0, 1, 3, 2)  # (N, C, F, T)
        x = x.reshape(n, c, f, r, t // r).permute(0, 1, 3, 2, 4)  # (N, C, r, F, T/r)
        return x.reshape(n, c, r * f, t // r)

    def forward(self, wave: torch.Tensor, augment: bool = False) -> torch.Tensor:
        # the power spectrum and log spread over ~20 decades: keep the front-end in fp32 under autocast
        with torch.autocast(device_type=wave.device.type, enabled=False):
            return self._forward(wave.float(), augment)

    def _forward(self, wave: torch.Tensor, augment: bool) -> torch.Tensor:
        x = self.log_mel(wave)  # (N, 1, T, M)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BN over mel bins
        if augment and self.cfg.spec_augment:
            x = _drop_stripes(x, dim=2, max_width=64, stripes=2)  # time
            x = _drop_stripes(x, dim=3, max_width=8, stripes=2)  # frequency
        if augment and self.cfg.mixup and x.shape[0] > 1:
            # clip k with clip N-1-k (HTS-AT do_mixup over the flattened B*T batch); the labels
            # are NOT mixed, as in the official code
            lam = torch.distributions.Beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha).sample(
                (x.shape[0],)).to(x.device, x.dtype).view(-1, 1, 1, 1)
            x = lam * x + (1 - lam) * x.flip(0)
        return self.fold(x)
