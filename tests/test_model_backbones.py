"""Frozen backbones: local weight loading (Swin via timm, HTS-AT official key format), front-end."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchaudio

from avmoe.config import tiny_audio, tiny_visual
from avmoe.models.backbones import HTSAT, SwinV2Visual, WeightLoadError
from avmoe.models.backbones.audio_frontend import HTSATFrontend


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def _tiny_timm_swin(num_classes: int = 10) -> torch.nn.Module:
    v = tiny_visual()
    return timm.create_model(v.name, pretrained=False, num_classes=num_classes, img_size=v.img_size,
                             embed_dim=v.embed_dim, depths=v.depths, num_heads=v.num_heads, window_size=v.window_size)


def _same_state(a: dict, b: dict, skip: str = "head.") -> None:
    keys = [k for k in a if not k.startswith(skip)]
    assert keys and set(keys) == {k for k in b if not k.startswith(skip)}
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_swin_loads_local_file_like_timm(tmp_path):
    torch.manual_seed(0)
    src = _tiny_timm_swin()
    _randomize(src, 1)
    pth = tmp_path / "swin.pth"
    torch.save(src.state_dict(), pth)
    ours = SwinV2Visual(tiny_visual(weights=str(pth)))
    _same_state(src.state_dict(), ours.model.state_dict())
    # timm's own local-file route gives the same tensors
    v = tiny_visual()
    via_timm = timm.create_model(v.name, pretrained=True, num_classes=0, img_size=v.img_size, embed_dim=v.embed_dim,
                                 depths=v.depths, num_heads=v.num_heads, window_size=v.window_size,
                                 pretrained_cfg_overlay=dict(file=str(pth)))
    _same_state(via_timm.state_dict(), ours.model.state_dict())
    # safetensors, and the original (timm 0.6 / Microsoft) layout: merge at the END of stage i
    from safetensors.torch import save_file

    old = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
           .replace("head.fc.", "head."): t.contiguous() for k, t in src.state_dict().items()}
    save_file(old, str(tmp_path / "swin_old.safetensors"))
    ours_old = SwinV2Visual(tiny_visual(weights=str(tmp_path / "swin_old.safetensors")))
    _same_state(src.state_dict(), ours_old.model.state_dict())


def test_swin_errors_name_the_keys(tmp_path):
    sd = _tiny_timm_swin().state_dict()
    del sd["layers.2.blocks.1.mlp.fc1.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(WeightLoadError, match=r"missing keys: layers\.2\.blocks\.1\.mlp\.fc1\.weight"):
        SwinV2Visual(tiny_visual(weights=str(tmp_path / "missing.pth")))
    sd = _tiny_timm_swin().state_dict()
    sd["norm.weight"] = torch.ones(7)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(WeightLoadError, match=r"shape mismatch: norm\.weight: file \(7,\)"):
        SwinV2Visual(tiny_visual(weights=str(tmp_path / "shape.pth")))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        SwinV2Visual(tiny_visual(weights=str(tmp_path / "absent.pth")))


def _official_htsat_checkpoint(model: HTSAT) -> dict:
    """Our HTS-AT state in the official Lightning layout: ``sed_model.`` prefix, patch merging at
    the end of stages, plus the keys the loader must ignore."""
    cfg = model.cfg
    sd = {}
    for k, v in model.state_dict().items():
        k = k.split(".", 1)[1]  # drop "swin." / "frontend."
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        sd["sed_model." + k] = v.clone()
    nf = cfg.n_fft // 2 + 1
    sd["sed_model.spectrogram_extractor.stft.conv_real.weight"] = torch.randn(nf, 1, cfg.n_fft)
    sd["sed_model.spectrogram_extractor.stft.conv_imag.weight"] = torch.randn(nf, 1, cfg.n_fft)
    sd["sed_model.logmel_extractor.melW"] = model.frontend.mel_fb.clone() * 1.5  # must be copied in
    sd["sed_model.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    sd["sed_model.layers.0.blocks.0.attn_mask"] = torch.zeros(4, 16, 16)
    sd["sed_model.tscam_conv.weight"] = torch.randn(527, 128, 2, 3)
    sd["sed_model.tscam_conv.bias"] = torch.randn(527)
    sd["sed_model.head.weight"] = torch.randn(527, 128)
    sd["sed_model.head.bias"] = torch.randn(527)
    return {"state_dict": sd, "epoch": 7, "global_step": 123}


def test_htsat_loads_official_checkpoint_format(tmp_path):
    torch.manual_seed(0)
    src = HTSAT(tiny_audio())
    _randomize(src, 2)
    with torch.no_grad():
        src.frontend.bn0.running_mean.normal_()
    ckpt = _official_htsat_checkpoint(src)
    assert "sed_model.layers.0.downsample.reduction.weight" in ckpt["state_dict"]  # end-of-stage layout
    torch.save(ckpt, tmp_path / "HTSAT_AudioSet_Saved_1.ckpt")
    ours = HTSAT(tiny_audio(weights=str(tmp_path / "HTSAT_AudioSet_Saved_1.ckpt")))
    for k, v in src.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert torch.equal(ours.frontend.mel_fb, src.frontend.mel_fb * 1.5)
    wave = torch.randn(2, 32000) * 0.1
    ours.eval(), src.eval()
    assert ours.forward_frozen(wave).shape == (2, 2, 2, 128)


def test_htsat_errors_name_official_keys(tmp_path):
    src = HTSAT(tiny_audio())
    ckpt = _official_htsat_checkpoint(src)
    del ckpt["state_dict"]["sed_model.layers.1.downsample.norm.weight"]  # merge of stage 1 -> timm stage 2
    torch.save(ckpt, tmp_path / "missing.ckpt")
    with pytest.raises(WeightLoadError, match=r"swin\.layers\.2\.downsample\.norm\.weight "
                                              r"\(sed_model\.layers\.1\.downsample\.norm\.weight\)"):
        HTSAT(tiny_audio(weights=str(tmp_path / "missing.ckpt")))
    ckpt = _official_htsat_checkpoint(src)
    ckpt["state_dict"]["sed_model.bn0.weight"] = torch.ones(3)
    torch.save(ckpt, tmp_path / "shape.ckpt")
    with pytest.raises(WeightLoadError, match=r"shape mismatch: frontend\.bn0\.weight"):
        HTSAT(tiny_audio(weights=str(tmp_path / "shape.ckpt")))


def test_frontend_logmel_matches_torchaudio_and_folds():
    cfg = tiny_audio()
    fe = HTSATFrontend(cfg).eval()
    wave = torch.randn(3, 32000) * 0.1
    ref = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, f_min=cfg.f_min,
        f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0, norm="slaney", mel_scale="slaney", center=True,
        pad_mode="reflect")(wave)
    ref = 10 * torch.log10(ref.clamp(min=1e-10)).transpose(1, 2).unsqueeze(1)
    ours = fe.log_mel(wave)
    assert ours.shape == (3, 1, 101, cfg.n_mels)  # 1 s at hop 320, centred
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    # fold: 4 time chunks of 64 frames stacked along frequency (HTS-AT reshape_wav2img)
    x = torch.arange(256 * 16, dtype=torch.float32).view(1, 1, 256, 16)
    img = fe.fold(x)
    assert img.shape == (1, 1, 64, 64)
    r, f, t = 2, 5, 7
    assert img[0, 0, r * 16 + f, t] == x[0, 0, r * 64 + t, f]
    assert fe(wave).shape == (3, 1, 64, 64)


def test_frontend_augmentations_only_when_asked():
    torch.manual_seed(0)
    fe = HTSATFrontend(tiny_audio(spec_augment=True, mixup=True)).eval()
    wave = torch.randn(4, 32000) * 0.1
    assert torch.equal(fe(wave), fe(wave))
    assert not torch.equal(fe(wave, augment=True), fe(wave))
