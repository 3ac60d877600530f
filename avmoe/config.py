"""Typed configuration: the shared model configs, the optimisation section, and the one
override grammar every config in avmoe uses (model configs, ``TrainConfig``, the CLI).

Configs are dataclasses deriving from :class:`Config`. Choices are ``Literal`` types and are
checked by :meth:`Config.validate`, with any cross-field rule in ``check()``. A task's own model
config (``AVEConfig``, ...) lives beside its head (``avmoe/models/heads/<task>.py``) and nests
the shared ones defined here (visual, audio, adapter, temporal).

Overrides (:func:`apply_overrides`), the same for every config:

* ``lr=1e-4`` sets a top-level field or, when unambiguous, the field of exactly one nested
  config (``num_tokens=8`` reaches ``adapter.num_tokens``);
* ``adapter.num_tokens=8`` (or ``adapter__num_tokens=8``) names the path explicitly;
* ``adapter={"num_cma": 2}`` merges a mapping into a nested config;
* a string value (the command line) is parsed by the field's type (``int``, ``float``,
  ``bool``, a ``Literal`` choice, ``None`` for an optional field, JSON for tuples, lists and
  dicts); any other value is type-checked against it.

Every mistake raises :class:`ConfigError` naming the key (a ``KeyError`` for an unknown or
ambiguous key, a ``ValueError`` for a bad value: it is both).

Choices recorded here (spec ../shared/spec/avmoe.md §8, numbers are that list's items):

* §8.1 UA: the canonical unimodal expert is "v2" (token compression + self-attention +
  linear bottleneck, no ReLU: ``ua_relu=False``) in the "paper" presets; the per-script
  variants ("none", "paramfree", "v1") are in the "official" presets.
* §8.2/§8.3 expert counts, K, r, G, BN, gates, adapted stages: "paper" presets follow the
  released *evaluation* scripts (spec §2.7; S4 = its test script: 2/2 experts, stages 0 and 2),
  "official" presets follow the *training* scripts (S4: 1/1, all stages, UA v1 with the code's
  attention across the micro-batch's frames, ``mha_axis="frames"``; ``"tokens"``, attention over
  each frame's tokens, is the reading of "self-attention" the other presets use for v1). K: the
  scripts pass 32, but the official AVS model builds 87 latent tokens ("official" AVS presets).
  AV-PEA (``kind="avpea"``) adapts every paired block (``avpea_coverage``).
* §8.4 audio adapters are added after the whole HTS-AT block (as the code, not the figure).
* §8.5 bridge: ``bridge="dense"`` (official N_y x N_x token mixing) by default;
  ``"pool"`` (area pooling / bilinear interpolation of the token grid) and ``"linear"``
  (dimension map only) are the parameter-light options.
* §8.6 attention in CMA/UA experts is unscaled with U[0,1) latents, as the code
  (``attn_scale=False``); ``attn_scale=True`` divides by sqrt(D).
* §8.7 soft dense routing, noise only in AVS (sigma 0.01), load balance weight 1.0 (AVVP),
  0.01 (MS3), else 0; summed over adapters (``lb_reduction="sum"``). Every preset computes
  the official value, −Σ_e log p̄_e (``lb_form="official"``: the code's router output is
  (B, 1, E), so its ``kl_div(log p̄, 1/p̄.size(0), "batchmean")`` has a target of 1.0 and a
  divisor of 1); the weights 1.0 / 0.01 were tuned with it. ``lb_form="kl"`` is the equation
  KL(U ‖ p̄) (gradient 1/E of the official), ``"kl_over_e"`` KL/E (gradient 1/E², our former
  default).
* §8.8 backbones are frozen AND in eval mode by default (no BN drift, no DropPath, no
  SpecAugment, no mixup); ``backbone_train_mode=True`` + ``audio.spec_augment`` +
  ``audio.mixup`` reproduce the official train-mode behaviour.
* Frame resize (``visual.antialias``): "official" presets and AVS interpolate like the official
  code (plain bicubic, no antialiasing, no clamp); AVE / AVVP / AVQA "paper" / "tiny" antialias.
* §8.9 warm starts (DG-SCT AVE head, AVQA grounding) are not part of the model; the
  trainer may load them with ``strict=False``.
* §8.10 model selection: always on the validation split (``val_split`` of the training
  config; the released AVE / AVS scripts select on test, which ``val_split=test`` reproduces);
  of equal scores the later checkpoint (Ray Train's retention order; the scripts keep the first).
* §8.13 AVQA: 42 answers; vocab size comes from the shards' manifest.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from typing import Any, Literal, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(KeyError, ValueError):
    """A configuration mistake; the message names the key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- types


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _union_args(tp) -> tuple | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def describe(tp) -> str:
    """Human-readable type, for error messages."""
    arms = _union_args(tp)
    if arms is not None:
        return " or ".join(describe(a) for a in arms)
    if tp is type(None):
        return "none"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return f"a JSON list ({getattr(tp, '__name__', str(tp))})"
    if origin is dict or tp is dict:
        return "a JSON object"
    return getattr(tp, "__name__", str(tp))


def type_ok(value: Any, tp) -> bool:
    """Whether ``value`` is an acceptable value of the annotation ``tp`` (ints stand for
    floats, lists for tuples, mappings for nested configs)."""
    if tp is Any:
        return True
    arms = _union_args(tp)
    if arms is not None:
        return any(type_ok(value, a) for a in arms)
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(type_ok(v, args[0]) for v in value)
        if origin is tuple:
            return len(value) == len(args) and all(type_ok(v, a) for v, a in zip(value, args))
        return all(type_ok(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type) and is_dataclass(tp):
        return isinstance(value, (tp, Mapping))
    return isinstance(value, tp) if isinstance(tp, type) else True


def parse_text(key: str, text: str, tp) -> Any:
    """Command-line text -> a value of the annotation ``tp`` (see the module docstring)."""
    low = text.strip().lower()
    arms = _union_args(tp) or (tp,)
    for arm in arms:  # a choice spelled like a keyword ("none") is that choice, not None
        if typing.get_origin(arm) is Literal and text.strip() in typing.get_args(arm):
            return text.strip()
    if low in ("none", "null") and type(None) in arms:
        return None
    candidates: list[Any] = []
    for arm in arms:
        if arm is type(None):
            continue
        origin = typing.get_origin(arm)
        try:
            if origin is Literal:
                for c in typing.get_args(arm):
                    if str(c) == text.strip():
                        candidates.append(c)
            elif arm is bool:
                if low in ("1", "true", "yes", "on"):
                    candidates.append(True)
                elif low in ("0", "false", "no", "off"):
                    candidates.append(False)
            elif arm is int:
                candidates.append(int(text))
            elif arm is float:
                candidates.append(float(text))
            elif origin in (tuple, list, dict) or arm in (tuple, list, dict) or (
                    isinstance(arm, type) and is_dataclass(arm)):
                try:
                    v = json.loads(text)
                except json.JSONDecodeError:
                    if not (origin is dict or arm is dict) or "=" not in text:
                        raise
                    v = _key_values(text)  # "ingest=1,CPU=0.5"
                if type_ok(v, arm):
                    candidates.append(tuple(v) if origin is tuple else v)
            elif arm is str or arm is Any:
                candidates.append(text)
        except (ValueError, json.JSONDecodeError):
            continue
    if not candidates:
        raise ConfigError(f"{key} must be {describe(tp)}; got {text!r}")
    return candidates[0]


def _key_values(text: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values JSON where they parse)."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(item)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def coerce(key: str, value: Any, tp) -> Any:
    """A Python value checked against ``tp`` (lists become tuples where a tuple is expected,
    ints floats)."""
    if not type_ok(value, tp):
        raise ConfigError(f"{key} must be {describe(tp)}; got {value!r}")
    arms = _union_args(tp) or (tp,)
    if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in arms):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and float in arms and int not in arms:
        return float(value)
    return value


# --------------------------------------------------------------------------- base class


@dataclass
class Config:
    """Base of every typed config: generic checks of types and ``Literal`` choices, nested
    configs included, then the subclass's cross-field ``check()``."""

    def validate(self, prefix: str = "") -> "Config":
        hints = _hints(type(self))
        for f in fields(self):
            value, key = getattr(self, f.name), prefix + f.name
            if isinstance(value, Config):
                value.validate(key + ".")
            elif not type_ok(value, hints[f.name]):
                raise ConfigError(f"{key} must be {describe(hints[f.name])}; got {value!r}")
        self.check(prefix)
        return self

    def check(self, prefix: str = "") -> None:
        """Cross-field rules of a subclass; raise ConfigError naming ``prefix + field``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- overrides


def _nested(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))}


def resolve_key(cfg: Any, key: str) -> list[str]:
    """Path of field names an override key names (see the module docstring)."""
    parts = key.replace("__", ".").split(".")
    if len(parts) > 1:
        obj = cfg
        for i, p in enumerate(parts):
            if not is_dataclass(obj) or p not in {f.name for f in fields(obj)}:
                raise ConfigError(f"unknown config key {key!r} (no field {p!r} at "
                                  f"{'.'.join(parts[:i]) or type(cfg).__name__})")
            obj = getattr(obj, p)
        return parts
    if key in {f.name for f in fields(cfg)}:
        return [key]
    hits = [[n, key] for n, sub in _nested(cfg).items() if key in {f.name for f in fields(sub)}]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConfigError(f"ambiguous config key {key!r}: use one of {['.'.join(h) for h in hits]}")
    known = sorted({f.name for f in fields(cfg)} | {
        f"{n}.{f.name}" for n, sub in _nested(cfg).items() for f in fields(sub)})
    raise ConfigError(f"unknown config key {key!r} for {type(cfg).__name__}; known: {', '.join(known)}")


def field_type(cfg: Any, path: list[str]):
    obj = cfg
    for p in path[:-1]:
        obj = getattr(obj, p)
    return _hints(type(obj))[path[-1]]


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], *, validate: bool = True,
                    prefix: str = "") -> Any:
    """Set ``overrides`` on ``cfg`` in place (validated afterwards) and return it."""
    for key, value in overrides.items():
        path = resolve_key(cfg, key)
        name = prefix + ".".join(path)
        obj = cfg
        for p in path[:-1]:
            obj = getattr(obj, p)
        old = getattr(obj, path[-1])
        tp = _hints(type(obj))[path[-1]]
        if is_dataclass(old) and isinstance(value, Mapping):
            apply_overrides(old, value, validate=False, prefix=name + ".")
            continue
        if isinstance(value, str):  # text: parsed by the field's type ("none" = None where optional)
            value = parse_text(name, value, tp)
        setattr(obj, path[-1], coerce(name, value, tp))
    if validate and isinstance(cfg, Config):
        cfg.validate(prefix)
    return cfg


def from_dict(cls: type, d: Mapping[str, Any]):
    """A config of class ``cls`` from a (possibly nested) dict, e.g. ``to_dict()``'s output."""
    return apply_overrides(cls(), d)


# --------------------------------------------------------------------------- shared configs


@dataclass
class VisualConfig(Config):
    """Frozen timm Swin-V2 visual encoder. Arch fields left ``None`` keep the timm model's own."""

    name: str = "swinv2_large_window12_192"
    img_size: int = 192
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    window_size: int | None = None
    drop_path_rate: float = 0.1  # timm default; only active with backbone_train_mode
    weights: str | None = None  # local .pth / .safetensors; never downloaded
    # frames of another size than img_size: True = antialiased bicubic, clamped to [0, 1] (close to
    # a PIL resize of the decoded image); False = plain bicubic, no antialiasing, no clamp: what
    # the official code computes (torchvision 0.14's Resize on float tensors in the AVE / AVVP /
    # AVQA loaders, F.interpolate in the AVS model); "official" presets and every AVS preset
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class AudioConfig(Config):
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

    def check(self, prefix: str = "") -> None:
        if self.n_mels > self.spec_size // self.freq_ratio:
            raise ConfigError(f"{prefix}n_mels={self.n_mels} exceeds spec_size/freq_ratio="
                              f"{self.spec_size // self.freq_ratio}")


@dataclass
class AdapterConfig(Config):
    """The adapters inserted into the paired blocks (spec §2)."""

    # moe | lavish (single latent-token CMA) | avpea | none (frozen trunk)
    kind: Literal["moe", "lavish", "avpea", "none"] = "moe"
    num_cma: int = 1  # cross-modal experts
    num_ua: int = 1  # unimodal experts
    # none | paramfree (AVVP NxN) | v1 (MHA) | v2 (token compression)
    ua_variant: Literal["none", "paramfree", "v1", "v2"] = "v2"
    num_tokens: int = 32  # latent tokens K
    reduction: int = 8  # bottleneck D -> D / r
    groups: int = 2  # grouped 1x1 conv G
    use_bn: bool = False
    visual_gate: bool = True  # zero-init output gate on visual experts (always in the code)
    audio_gate: bool = True  # is_gate: False = audio experts add an ungated residual from step 0
    bridge: Literal["dense", "pool", "linear"] = "dense"
    num_skip: int = 2  # 2: stages 1 and 3 unadapted; 1: all stages
    adapted_stages: tuple[int, ...] | None = None  # overrides num_skip (and avpea_coverage) when set
    # AV-PEA (kind="avpea", adapters/avpea.py): "all" paired blocks, as its paper adapts every
    # block, or those num_skip selects; its width map: a learned Linear or parameter-free resampling
    avpea_coverage: Literal["all", "num_skip"] = "all"
    avpea_map: Literal["linear", "resample"] = "linear"
    router_hidden: tuple[int, ...] = (128, 32)
    router_noise: float = 0.0  # std of Gaussian logit noise in training (AVS: 0.01)
    lb_weight: float = 0.0
    lb_reduction: Literal["sum", "mean"] = "sum"  # over adapters
    lb_form: Literal["official", "kl", "kl_over_e"] = "official"  # see load_balance_loss
    ua_relu: bool = False
    attn_scale: bool = False
    mha_heads: int = 4  # UA v1
    mha_dropout: float = 0.2
    # UA v1: attend over each frame's tokens, or across the micro-batch's frames per token (the
    # official code: nn.MultiheadAttention without batch_first); experts.UnimodalExpert
    mha_axis: Literal["tokens", "frames"] = "tokens"

    def check(self, prefix: str = "") -> None:
        if self.kind == "moe" and self.num_cma + self.num_ua < 1:
            raise ConfigError(f"{prefix}kind='moe' needs at least one expert (num_cma + num_ua >= 1)")
        if min(self.num_cma, self.num_ua) < 0 or self.num_tokens < 1 or self.reduction < 1:
            raise ConfigError(f"{prefix}num_cma/num_ua/num_tokens/reduction: adapter counts, "
                              "num_tokens and reduction must be positive")


@dataclass
class TemporalConfig(Config):
    """The CMRAN/DG-SCT TemporalAttention encoder shared by AVE and AVS (spec §3.1 steps 3-6)."""

    audio_dim: int = 128  # audio LSTM input; its hidden size (bi-LSTM out = 2x)
    d_model: int = 256  # visual LSTM hidden; encoder / decoder width
    heads: int = 4
    ffn: int = 1024
    enc_layers: int = 2
    dropout: float = 0.1
    input_dropout: float = 0.2


@dataclass
class TaskConfig(Config):
    """The model config fields shared by every task; a task's config adds its head's."""

    task: str = ""
    preset: str = ""
    num_segments: int = 10  # 1-s segments per sample, from the shards' manifest
    visual: VisualConfig = field(default_factory=VisualConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    backbone_train_mode: bool = False


@dataclass
class OptimConfig(Config):
    """Optimisation schedule. A task's ``training_defaults(preset)`` fills every field from the
    released scripts (spec §3); in ``TrainConfig.optim`` a field left ``None`` takes that default.

    Gradient accumulation: DeepSpeed averages the loss over the accumulation window (the
    released scripts sum it; with Adam that only changes epsilon's relative weight, spec §8.14).
    The step scheduler's ``step_size`` is in epochs."""

    optimizer: Literal["adam", "adamw"] | None = None  # torch optimizers (no DeepSpeed op build)
    lr: float | None = None
    weight_decay: float | None = None
    scheduler: Literal["step", "none"] | None = None
    step_size: int | None = None  # epochs
    gamma: float | None = None
    epochs: int | None = None
    batch_size: int | None = None  # per worker (micro-batch)
    grad_accum: int | None = None
    early_stop: int | None = None  # epochs without validation improvement; None/0 = off
    seed: int | None = None

    def merged(self, over: "OptimConfig") -> "OptimConfig":
        """These values with ``over``'s non-None ones on top."""
        return dataclasses.replace(self, **{f.name: getattr(over, f.name) for f in fields(over)
                                            if getattr(over, f.name) is not None})

    def check(self, prefix: str = "") -> None:
        for name in ("epochs", "batch_size", "grad_accum", "step_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{prefix}{name} must be >= 1; got {v}")
        for name in ("lr", "weight_decay", "gamma"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{prefix}{name} must be >= 0; got {v}")
        if self.early_stop is not None and self.early_stop < 0:
            raise ConfigError(f"{prefix}early_stop must be >= 0; got {self.early_stop}")

    def check_complete(self, prefix: str = "") -> None:
        """The resolved schedule has every field the trainer needs."""
        missing = [f.name for f in fields(self) if getattr(self, f.name) is None
                   and f.name not in ("early_stop", "step_size", "gamma")]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]}: no value and no task default")
        if self.scheduler == "step" and not self.step_size:
            raise ConfigError(f"{prefix}step_size: scheduler=step needs step_size=N (epochs)")


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
