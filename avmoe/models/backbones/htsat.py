"""Frozen audio encoder: HTS-AT = our front-end + timm's Swin-V1 over the folded spectrogram.

HTS-AT's encoder is a standard Swin-V1 (4x4 patches on a 1-channel 256x256 image, dims 96..768,
depths (2, 2, 6, 2), heads (4, 8, 16, 32), window 8, no absolute position embedding), so timm's
``SwinTransformer`` with ``in_chans=1`` holds it exactly; the SED head (``tscam_conv``, ``head``)
is not built. As in DG-SCT/AVMoE the final ``norm`` is loaded but not applied: the feature is
the mean of the last-stage tokens (spec §1.1).

Official checkpoint (``HTSAT_AudioSet_Saved_1.ckpt``, Lightning, keys ``sed_model.*``):

=================================================  ==========================================
official key                                       here
=================================================  ==========================================
``sed_model.bn0.*``                                ``frontend.bn0.*``
``sed_model.logmel_extractor.melW`` (F, M)         ``frontend.mel_fb`` (copied if shapes fit)
``sed_model.patch_embed.{proj,norm}.*``            ``swin.patch_embed.*``
``sed_model.layers.i.blocks.j.*``                  ``swin.layers.i.blocks.j.*``
``sed_model.layers.i.downsample.*`` (end of i)     ``swin.layers.(i+1).downsample.*`` (start)
``sed_model.norm.*``                               ``swin.norm.*``
``spectrogram_extractor``, ``tscam_conv``,         ignored (DFT basis, SED head)
``head``, ``attn_mask``, ``relative_position_index``
=================================================  ==========================================

Missing backbone keys and shape mismatches raise :class:`WeightLoadError` naming the keys.
"""

from __future__ import annotations

import re

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from avmoe.config import AudioConfig
from avmoe.models.backbones.audio_frontend import HTSATFrontend
from avmoe.models.backbones.weights import WeightLoadError, load_checked, read_state_dict
from avmoe.models.registries import BACKBONES

_IGNORED = ("spectrogram_extractor.", "tscam_conv.", "head.")
_BUFFERS = ("attn_mask", "relative_position_index")


def convert_official_htsat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official HTS-AT keys -> this module's keys (see the module docstring's table).

    Already-converted state dicts (``frontend.*`` / ``swin.*``) pass through unchanged."""
    if any(k.startswith(("frontend.", "swin.")) for k in sd):
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k[len("sed_model."):] if k.startswith("sed_model.") else k
        if k.startswith(_IGNORED) or k.endswith(_BUFFERS):
            continue
        if k == "logmel_extractor.melW":
            out["frontend.mel_fb"] = v
        elif k.startswith("logmel_extractor."):
            continue
        elif k.startswith("bn0."):
            out["frontend." + k] = v
        else:
            # HTS-AT (like timm 0.6) merges patches at the END of stage i; timm 1.x at the
            # START of stage i+1
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            out["swin." + k] = v
    return out


def official_htsat_name(key: str) -> str:
    """Our key -> "key (sed_model.<official key>)", for error messages."""
    k = key.split(".", 1)[1] if key.startswith(("swin.", "frontend.")) else key
    k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
    return f"{key} (sed_model.{k})"


@BACKBONES.register("htsat")
class HTSAT(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.frontend = HTSATFrontend(cfg)
        self.swin = SwinTransformer(
            img_size=cfg.spec_size, patch_size=cfg.patch_size, in_chans=1, num_classes=0,
            global_pool="", embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
            window_size=cfg.window_size, drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
            drop_path_rate=cfg.drop_path_rate,
        )
        if cfg.weights:
            self.load_weights(cfg.weights)

    def load_weights(self, path: str) -> None:
        sd = convert_official_htsat(read_state_dict(path))
        mel = sd.pop("frontend.mel_fb", None)
        if mel is not None:
            if tuple(mel.shape) != tuple(self.frontend.mel_fb.shape):
                raise WeightLoadError(
                    f"HTS-AT weights {path}: shape mismatch: sed_model.logmel_extractor.melW: file "
                    f"{tuple(mel.shape)} vs model {tuple(self.frontend.mel_fb.shape)}")
            self.frontend.mel_fb.copy_(mel)
        load_checked(self, sd, what=f"HTS-AT weights {path}", describe=official_htsat_name)

    @property
    def stages(self) -> nn.Sequential:
        return self.swin.layers

    def embed(self, wave: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """(N, samples) -> (N, h, w, C) patch tokens (HTS-AT has no APE; pos_drop p = 0)."""
        return self.swin.patch_embed(self.frontend(wave, augment=augment))

    def forward_frozen(self, wave: torch.Tensor) -> torch.Tensor:
        """Reference path: (N, h, w, C) last-stage tokens, final norm not applied."""
        return self.swin.layers(self.embed(wave))
