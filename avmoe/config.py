"""Typed configuration of the AVMoE models (backbones, adapters, heads) and their optimisation.

One dataclass per concept; a task config (``AVEConfig``, ...) nests the shared ones. Presets
("tiny", "paper", "official") are built by the task modules (``avmoe/tasks``) from the helpers
at the bottom of this file, then overridden key by key with :func:`apply_overrides`:

* ``lr=1e-4`` sets a top-level field (of the task config or, when unambiguous, of exactly one
  nested config: ``num_tokens=8`` reaches ``adapter.num_tokens``);
* ``**{"adapter.num_tokens": 8}`` or ``adapter__num_tokens=8`` name the path explicitly;
* ``adapter={"num_cma": 2}`` merges a dict into a nested config.

An unknown (or ambiguous) key raises a ``KeyError`` that names it and lists the candidates.

Choices recorded here (spec ../shared/spec/avmoe.md §8, numbers are that list's items):

* §8.1 UA: the canonical unimodal expert is "v2" (token compression + self-attention +
  linear bottleneck, no ReLU: ``ua_relu=False``) in the "paper" presets; the per-script
  variants ("none", "paramfree", "v1") are in the "official" presets.
* §8.2/§8.3 expert counts, K, r, G, BN, gates, adapted stages: "paper" presets follow the
  released *evaluation* scripts (spec §2.7; S4 = its test script: 2/2 experts, stages 0 and 2),
  "official" presets follow the *training* scripts (S4: 1/1, all stages, UA v1).
* §8.4 audio adapters are added after the whole HTS-AT block (as the code, not the figure).
* §8.5 bridge: ``bridge="dense"`` (official N_y x N_x token mixing) by default;
  ``"pool"`` (area pooling / bilinear interpolation of the token grid) and ``"linear"``
  (dimension map only) are the parameter-light options.
* §8.6 attention in CMA/UA experts is unscaled with U[0,1) latents, as the code
  (``attn_scale=False``); ``attn_scale=True`` divides by sqrt(D).
* §8.7 soft dense routing, noise only in AVS (sigma 0.01), load balance weight 1.0 (AVVP),
  0.01 (MS3), else 0; summed over adapters (``lb_reduction="sum"``). The official
  ``F.kl_div(log p, U, reduction="batchmean")`` on a 1-D tensor divides the KL by E
  (``lb_batchmean=True`` reproduces that; False gives the plain KL(U || p)).
* §8.8 backbones are frozen AND in eval mode by default (no BN drift, no DropPath, no
  SpecAugment, no mixup); ``backbone_train_mode=True`` + ``audio.spec_augment`` +
  ``audio.mixup`` reproduce the official train-mode behaviour.
* §8.9 warm starts (DG-SCT AVE head, AVQA grounding) are not part of the model; the
  trainer may load them with ``strict=False``.
* §8.13 AVQA: 42 answers; vocab size comes in the config (93 = original train json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ADAPTER_KINDS = ("moe", "lavish", "avpea", "none")
UA_VARIANTS = ("none", "paramfree", "v1", "v2")
BRIDGES = ("dense", "pool", "linear")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class VisualConfig:
    """Frozen timm Swin-V2 visual encoder. Arch fields left ``None`` keep the timm model's own."""

    name: str = "swinv2_large_window12_192"
    img_size: int = 192
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    window_size: int | None = None
    drop_path_rate: float = 0.1  # timm default; only active with backbone_train_mode
    weights: str | None = None  # local .pth / .safetensors; never downloaded
    antialias: bool = True  # resize like PIL (AVS: False, its model interpolates tensors)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class AudioConfig:
    """HTS-AT: log-mel front-end + Swin-V1 over the folded spectrogram image (spec §1.1)."""

    sample_rate: int = 32000
    segment_seconds: float = 1.0
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    spec_size: int = 256  # image side; time is interpolated to spec_size * freq_ratio frames
    freq_ratio: int = 4
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    drop_path_rate: float = 0.1
    weights: str | None = None  # official HTS-AT checkpoint (``sed_model.`` keys) or our own
    spec_augment: bool = False  # official: on in train mode (2 time masks <= 64, 2 freq <= 8)
    mixup: bool = False  # official AVVP/AVS/AVQA: clip k mixed with clip BT-1-k, labels not mixed
    mixup_alpha: float = 0.5

    @property
    def segment_samples(self) -> int:
        return int(round(self.sample_rate * self.segment_seconds))

    def validate(self) -> None:
        if self.n_mels > self.spec_size // self.freq_ratio:
            raise ValueError(
                f"n_mels={self.n_mels} exceeds spec_size/freq_ratio={self.spec_size // self.freq_ratio}"
            )


@dataclass
class AdapterConfig:
    """The adapters inserted into the paired blocks (spec §2)."""

    kind: str = "moe"  # moe | lavish (single latent-token CMA) | avpea | none (frozen trunk)
    num_cma: int = 1  # cross-modal experts
    num_ua: int = 1  # unimodal experts
    ua_variant: str = "v2"  # none | paramfree (AVVP NxN) | v1 (MHA) | v2 (token compression)
    num_tokens: int = 32  # latent tokens K
    reduction: int = 8  # bottleneck D -> D / r
    groups: int = 2  # grouped 1x1 conv G
    use_bn: bool = False
    visual_gate: bool = True  # zero-init output gate on visual experts (always in the code)
    audio_gate: bool = True  # is_gate: False = audio experts add an ungated residual from step 0
    bridge: str = "dense"  # dense | pool | linear
    num_skip: int = 2  # 2: stages 1 and 3 unadapted; 1: all stages
    adapted_stages: tuple[int, ...] | None = None  # overrides num_skip when set
    router_hidden: tuple[int, ...] = (128, 32)
    router_noise: float = 0.0  # std of Gaussian logit noise in training (AVS: 0.01)
    lb_weight: float = 0.0
    lb_reduction: str = "sum"  # sum | mean over adapters
    lb_batchmean: bool = True
    ua_relu: bool = False
    attn_scale: bool = False
    mha_heads: int = 4  # UA v1
    mha_dropout: float = 0.2

    def validate(self) -> None:
        _choice("adapter.kind", self.kind, ADAPTER_KINDS)
        _choice("adapter.ua_variant", self.ua_variant, UA_VARIANTS)
        _choice("adapter.bridge", self.bridge, BRIDGES)
        _choice("adapter.lb_reduction", self.lb_reduction, ("sum", "mean"))
        if self.kind == "moe" and self.num_cma + self.num_ua < 1:
            raise ValueError("adapter.kind='moe' needs at least one expert (num_cma + num_ua >= 1)")
        if min(self.num_cma, self.num_ua) < 0 or self.num_tokens < 1 or self.reduction < 1:
            raise ValueError("adapter counts, num_tokens and reduction must be positive")


@dataclass
class OptimConfig:
    """Optimisation defaults of the released scripts (spec §3). Gradient accumulation sums
    gradients without dividing the loss in the code; the trainer decides what to do."""

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "none"  # step | none
    step_size: int = 0  # epochs
    gamma: float = 1.0
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    early_stop: int | None = None  # epochs without improvement
    seed: int = 0
    select_split: str = "val"

    def validate(self) -> None:
        _choice("optim.scheduler", self.scheduler, ("step", "none"))


@dataclass
class TemporalConfig:
    """The CMRAN/DG-SCT TemporalAttention encoder shared by AVE and AVS (spec §3.1 steps 3-6)."""

    audio_dim: int = 128  # audio LSTM input; its hidden size (bi-LSTM out = 2x)
    d_model: int = 256  # visual LSTM hidden; encoder / decoder width
    heads: int = 4
    ffn: int = 1024
    enc_layers: int = 2
    dropout: float = 0.1
    input_dropout: float = 0.2


@dataclass
class TaskConfig:
    """Fields shared by every task; subclasses add the head's."""

    task: str = ""
    preset: str = ""
    num_segments: int = 10  # 1-s segments per sample (AVS 5); sizes AVVP's HAN block
    visual: VisualConfig = field(default_factory=VisualConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backbone_train_mode: bool = False

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate()


@dataclass
class AVEConfig(TaskConfig):
    num_classes: int = 28  # + background (index 28) in the labels
    visual_dim: int = 512  # Linear(1536 -> 512) + ReLU + Dropout before the visual LSTM
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    gate_scale: float = 0.1  # V_q <- V_q (1 + 0.1 g_a)
    topk: int = 4  # CMBS top-k mean over time
    av_score_weight: float = 0.3


@dataclass
class AVVPConfig(TaskConfig):
    num_classes: int = 25
    dim: int = 128
    st_dim: int = 512  # R(2+1)D-18 clip features
    depth_vis: int = 3
    depth_aud: int = 3
    depth_av: int = 6
    num_heads: int = 8
    drop_path: float = 0.1
    audio_target_scale: float = 1.0  # Pa = a*y + (1-a)*0.5
    visual_target_scale: float = 0.9  # Pv = 0.9 y + 0.05 (label smoothing on the visual target)
    clamp_eps: float = 1e-7


@dataclass
class AVSConfig(TaskConfig):
    setting: str = "s4"  # s4 | ms3
    channels: int = 256  # audio is projected to temporal.audio_dim (128)
    map_sizes: tuple[int, ...] = (56, 28, 14, 7)  # mask = 4 x map_sizes[0] (224)
    decoder_mid: int = 128
    decoder_last: int = 32
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    gamma: float = 0.05  # S4 0.05 (hard-coded), MS3 0.1
    avm_weight: float = 0.0  # MS3: 0.5
    eval_videos_per_batch: int | None = 4  # AVSBench test batch (metrics quirk)

    def validate(self) -> None:
        super().validate()
        _choice("setting", self.setting, ("s4", "ms3"))
        if len(self.map_sizes) != 4:
            raise ValueError("map_sizes must have 4 entries (one per Swin stage)")

    @property
    def mask_size(self) -> int:
        return 4 * self.map_sizes[0]


@dataclass
class AVQAConfig(TaskConfig):
    vocab_size: int = 93
    num_answers: int = 42
    max_question_len: int = 14
    match_weight: float = 0.5
    match_hidden: tuple[int, ...] = (512, 256, 128)
    qa_heads: int = 4
    dropout: float = 0.1


# --------------------------------------------------------------------------- overrides


def _nested_fields(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))}


def _resolve(cfg: Any, key: str) -> list[str]:
    """Path of field names for an override key (see module docstring)."""
    parts = key.replace("__", ".").split(".")
    if len(parts) > 1:
        obj = cfg
        for i, p in enumerate(parts):
            if not is_dataclass(obj) or p not in {f.name for f in fields(obj)}:
                raise KeyError(f"unknown config key {key!r} (no field {p!r} at "
                               f"{'.'.join(parts[:i]) or type(cfg).__name__})")
            obj = getattr(obj, p)
        return parts
    if key in {f.name for f in fields(cfg)}:
        return [key]
    hits = [[n, key] for n, sub in _nested_fields(cfg).items() if key in {f.name for f in fields(sub)}]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise KeyError(f"ambiguous config key {key!r}: use one of {['.'.join(h) for h in hits]}")
    known = sorted({f.name for f in fields(cfg)} | {
        f"{n}.{f.name}" for n, sub in _nested_fields(cfg).items() for f in fields(sub)})
    raise KeyError(f"unknown config key {key!r} for {type(cfg).__name__}; known: {', '.join(known)}")


def _coerce(old: Any, new: Any) -> Any:
    if isinstance(old, tuple) and isinstance(new, list):
        return tuple(new)
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    return new


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Set ``overrides`` on ``cfg`` in place (validated afterwards) and return it."""
    for key, value in overrides.items():
        path = _resolve(cfg, key)
        obj = cfg
        for p in path[:-1]:
            obj = getattr(obj, p)
        old = getattr(obj, path[-1])
        if is_dataclass(old) and isinstance(value, Mapping):
            apply_overrides(old, {k: v for k, v in value.items()})
        elif is_dataclass(old) and not isinstance(value, type(old)):
            raise TypeError(f"{key} must be a {type(old).__name__} or a dict, got {type(value).__name__}")
        else:
            setattr(obj, path[-1], _coerce(old, value))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- shared presets


def paper_visual(**kw: Any) -> VisualConfig:
    return VisualConfig(**kw)


def tiny_visual(**kw: Any) -> VisualConfig:
    """Same Swin-V2 code path, 32x32 images: stage grids 8, 4, 2, 1; stage 2 keeps the 3:1
    block pairing with the audio encoder that the real model has (18:6)."""
    base = dict(img_size=32, embed_dim=16, depths=(1, 1, 3, 1), num_heads=(2, 2, 4, 4), window_size=4)
    base.update(kw)
    return VisualConfig(**base)


def paper_audio(**kw: Any) -> AudioConfig:
    return AudioConfig(**kw)


def tiny_audio(**kw: Any) -> AudioConfig:
    """Same HTS-AT code path with 16 mel bins folded into a 64x64 image (grids 16, 8, 4, 2)."""
    base = dict(n_mels=16, spec_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4),
                window_size=4)
    base.update(kw)
    return AudioConfig(**base)


def tiny_temporal() -> TemporalConfig:
    return TemporalConfig(audio_dim=16, d_model=32, heads=4, ffn=64, enc_layers=1)


# Tiny presets keep the task's real number of segments (so they also run on real shards);
# the CPU tests ask for fewer with ``num_segments=``.


def tiny_adapter(**kw: Any) -> dict[str, Any]:
    """Adapter sizes for the tiny trunks (dims 16..128): K=4, r=4, G=2, all stages adapted."""
    base = dict(num_tokens=4, reduction=4, groups=2, num_skip=1, router_hidden=(16, 8), mha_heads=2)
    base.update(kw)
    return base
