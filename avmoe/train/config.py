"""Typed configuration of a training (or evaluation) run.

``TrainConfig`` holds what the *trainer* decides (cluster shape, DeepSpeed, checkpoints, data
URLs, OGM-GE); the model and its optimiser defaults stay in the task config
(``avmoe/config.py``, ``task.config(preset, **model)``). Fields left ``None`` take the task's
defaults (../shared/spec/avmoe.md §3 via ``task.optimizer_defaults``).

``TrainConfig.validate()`` builds the task config too, so every error a user can make in a
config (unknown key, wrong type, bad choice) is raised on the driver before any Ray resource
is taken, as ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

TASKS = ("ave", "avvp", "avs", "avqa")
MODULATIONS = ("none", "ogm", "ogm_ge")
PRECISIONS = ("auto", "fp32", "bf16")
EVAL_DROPS = ("audio", "visual")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key."""


@dataclass
class TrainConfig:
    # ---- what to train
    task: str = "ave"
    setting: str | None = None  # avs: "s4" | "ms3"
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # task-config overrides (key=value)
    # ---- data and storage
    data: str | None = None  # shard URL (local path, file://, s3://...) holding {split}.manifest.json
    storage: str = "runs"  # checkpoints + results: local path or s3://...
    name: str | None = None  # run name; re-running with the same name resumes from its latest checkpoint
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # ---- cluster shape
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # worker-group restarts from the latest checkpoint (FailureConfig)
    # ---- optimisation (None = the task's default from spec §3)
    epochs: int | None = None
    batch_size: int | None = None  # per worker (micro-batch)
    grad_accum: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None  # adam | adamw (torch optimizers; no DeepSpeed op build)
    scheduler: str | None = None  # step | none
    early_stop: int | None = None  # epochs without validation improvement (None = task default)
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the released scripts do not clip)
    seed: int | None = None
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in total
    limit_train_batches: int | None = None  # per epoch and rank (smoke runs)
    limit_eval_batches: int | None = None
    # ---- DeepSpeed
    zero_stage: int = 0
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    deepspeed_config: str | None = None  # JSON file or inline JSON merged over ours
    # ---- ingest
    shuffle_buffer: int = 256
    read_concurrency: int | None = None
    prefetch_batches: int = 2
    on_error: str = "raise"  # bad samples: raise | skip (counted in the metrics)
    decode_cpus: float | None = None  # CPUs of one decode task (None = ingest default, 1)
    # ---- checkpoints / evaluation
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps (mid-epoch)
    keep_checkpoints: int = 2  # best on validation + latest are always among them
    eval_only: str | None = None  # checkpoint path/URL: evaluate it on the test split, no training
    eval_drop: str | None = None  # audio | visual: also report the metric with that modality absent
    test: bool = True  # evaluate the best (validation) checkpoint on the test split at the end
    plots: bool = True
    # ---- OGM-GE (../shared/spec/related-methods.md §1; ave, avvp, avqa)
    modulation: str = "none"  # none | ogm | ogm_ge
    ogm_alpha: float = 0.1
    ogm_start_epoch: int = 0
    ogm_end_epoch: int = 50
    # ---- telemetry (avmoe.telemetry.WorkerMetrics)
    metrics: bool = True
    metrics_address: str | None = None  # None = telemetry's default bind address
    metrics_port: int | None = None  # None = telemetry's default; 0 = any free port
    # ---- test hooks (never set in production): "STEP:RANK:MARKER" makes RANK exit hard after
    # optimizer step STEP unless the file MARKER exists (created just before dying), so the run
    # fails exactly once and must recover from its last checkpoint.
    fault_injection: str | None = None
    stream_factory: str | None = None  # "module:function" building the data source (tests)

    # ------------------------------------------------------------------ derived

    @property
    def task_name(self) -> str:
        """The name ``avmoe.tasks.get_task`` knows and manifests record (avs -> avs-s4/avs-ms3)."""
        return f"avs-{self.setting or 's4'}" if self.task == "avs" else self.task

    def run_name(self) -> str:
        if self.name:
            return self.name
        import time

        suffix = f"-{self.setting or 's4'}" if self.task == "avs" else ""
        return f"{self.task}{suffix}-{self.preset}-{time.strftime('%Y%m%d-%H%M%S')}"

    def task_config(self):
        """The typed model config (preset + ``model`` overrides)."""
        from avmoe.tasks import get_task

        from avmoe.config import _resolve

        over = dict(self.model)
        if "setting" in over:
            raise ConfigError("model.setting: choose the AVS setting with setting=s4|ms3 (--setting)")
        variant = {"setting": self.setting or "s4"} if self.task == "avs" else {}
        task = get_task(self.task)
        try:
            base = task.config(preset=self.preset, **variant)
            for key, value in over.items():  # the task config checks names; check types here
                obj = base
                path = _resolve(base, key)
                for p in path[:-1]:
                    obj = getattr(obj, p)
                _check_model_type(f"model.{key}", getattr(obj, path[-1]), value)
            return task.config(preset=self.preset, **variant, **over)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            msg = e.args[0] if e.args else str(e)
            raise ConfigError(f"model config: {msg}") from None

    def optim(self, cfg=None) -> dict[str, Any]:
        """Task defaults (spec §3) with this config's explicit values over them."""
        from avmoe.tasks import get_task

        cfg = cfg if cfg is not None else self.task_config()
        d = get_task(self.task).optimizer_defaults(cfg)
        for key, dkey in (("epochs", "epochs"), ("batch_size", "batch_size"), ("grad_accum", "grad_accumulation"),
                          ("lr", "lr"), ("weight_decay", "weight_decay"), ("optimizer", "optimizer"),
                          ("early_stop", "early_stop"), ("seed", "seed")):
            if getattr(self, key) is not None:
                d[dkey] = getattr(self, key)
        if self.scheduler is not None:
            d["scheduler"] = (dict(d["scheduler"], name="step") if self.scheduler == "step"
                              else {"name": "none"})
            if self.scheduler == "step" and not d["scheduler"].get("step_size"):
                raise ConfigError("scheduler=step needs the task config's optim.step_size > 0 "
                                  "(set model.optim.step_size=N)")
        return d

    # ------------------------------------------------------------------ validation

    def validate(self) -> "TrainConfig":
        def choice(key, value, choices):
            if value not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")

        _check_types(self)
        choice("task", self.task, TASKS)
        if self.task == "avs":
            choice("setting", self.setting or "s4", ("s4", "ms3"))
        elif self.setting is not None:
            raise ConfigError(f"setting applies to avs only (task={self.task!r})")
        choice("preset", self.preset, ("tiny", "paper", "official"))
        choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        choice("precision", self.precision, PRECISIONS)
        choice("modulation", self.modulation, MODULATIONS)
        choice("on_error", self.on_error, ("raise", "skip"))
        if self.optimizer is not None:
            choice("optimizer", self.optimizer, ("adam", "adamw"))
        if self.scheduler is not None:
            choice("scheduler", self.scheduler, ("step", "none"))
        if self.eval_drop is not None:
            choice("eval_drop", self.eval_drop, EVAL_DROPS)
        for key in ("workers", "epochs", "batch_size", "grad_accum", "max_steps", "limit_train_batches",
                    "limit_eval_batches", "checkpoint_every", "keep_checkpoints", "prefetch_batches"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be >= 1; got {v}")
        for key in ("gpus_per_worker", "cpus_per_worker", "decode_cpus", "grad_clip", "lr", "weight_decay", "ogm_alpha"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"{key} must be >= 0; got {v}")
        if self.max_failures < -1:
            raise ConfigError("max_failures must be >= -1 (-1 = retry forever)")
        if not self.data and not self.eval_only:
            raise ConfigError("data: no shard URL given (--data URL, e.g. s3://bucket/shards/ave)")
        if not self.storage:
            raise ConfigError("storage: no storage URL given (--storage URL)")
        if self.modulation != "none":
            if self.task == "avs":
                raise ConfigError("modulation: OGM-GE applies to the classification-style tasks "
                                  "(ave, avvp, avqa), not avs")
            if self.zero_stage != 0:
                # ZeRO >= 1 keeps the reduced gradients in DeepSpeed's partitioned flat buffers,
                # not in param.grad, so there is no per-parameter tensor to modulate after the
                # all-reduce; see avmoe/train/ogm.py.
                raise ConfigError(f"modulation={self.modulation!r} needs zero_stage=0 "
                                  f"(got zero_stage={self.zero_stage}); see avmoe/train/ogm.py")
        if self.fault_injection is not None:
            parse_fault(self.fault_injection)
        self.deepspeed_overrides()  # parse errors name the key
        cfg = self.task_config()
        self.optim(cfg)
        return self

    def deepspeed_overrides(self) -> dict[str, Any]:
        if not self.deepspeed_config:
            return {}
        text = self.deepspeed_config
        try:
            if not text.lstrip().startswith("{"):
                with open(text) as f:
                    text = f.read()
            d = json.loads(text)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"deepspeed_config: cannot read {self.deepspeed_config!r}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("deepspeed_config: must be a JSON object")
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return apply(cls(), d)


def _check_model_type(key: str, old: Any, new: Any) -> None:
    """A model override must have the preset value's type (ints may stand for floats, lists for
    tuples, dicts for nested configs; a None default accepts anything)."""
    if old is None or new is None and not isinstance(old, (int, float, bool, str)):
        return
    if dataclasses.is_dataclass(old):
        ok = isinstance(new, Mapping)
    elif isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, tuple):
        ok = isinstance(new, (list, tuple))
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise ConfigError(f"{key} must be {type(old).__name__} (preset value {old!r}); got {new!r}")


def parse_fault(spec: str) -> tuple[int, int, str]:
    try:
        step, rank, marker = spec.split(":", 2)
        return int(step), int(rank), marker
    except ValueError:
        raise ConfigError(f"fault_injection must be 'STEP:RANK:MARKER_PATH'; got {spec!r}") from None


# --------------------------------------------------------------------------- key=value parsing

_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def _is_union(tp) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _allowed(tp) -> tuple[type, ...]:
    base = tuple(a for a in typing.get_args(tp) if a is not type(None)) if _is_union(tp) else (tp,)
    return tuple(typing.get_origin(a) or a for a in base)


def _optional(tp) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _check_types(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        tp = _hints()[f.name]
        if v is None:
            if _optional(tp):
                continue
            raise ConfigError(f"{f.name} must not be None")
        ok = _allowed(tp)
        if isinstance(v, bool) and bool not in ok:
            raise ConfigError(f"{f.name} must be {'/'.join(t.__name__ for t in ok)}; got {v!r}")
        if not isinstance(v, ok) and not (float in ok and isinstance(v, int)):
            raise ConfigError(f"{f.name} must be {'/'.join(t.__name__ for t in ok)}; got {v!r}")


def parse_value(key: str, text: str, tp=None) -> Any:
    """``key=value`` text -> a typed value (for TrainConfig fields with ``tp``, else JSON-ish)."""
    low = text.strip().lower()
    if tp is not None:
        ok = _allowed(tp)
        if low in ("none", "null") and _optional(tp):
            return None
        if bool in ok:
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key} must be true/false; got {text!r}")
        if int in ok and float not in ok:
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"{key} must be an integer; got {text!r}") from None
        if float in ok:
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"{key} must be a number; got {text!r}") from None
        if dict in ok:
            try:
                v = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{key} must be a JSON object; got {text!r}") from None
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be a JSON object; got {text!r}")
            return v
        return text
    # model keys: JSON literal when it parses (numbers, true/false, lists, null), else a string
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Set trainer fields; ``model.<key>`` (or an unknown-to-the-trainer key that the task
    config knows) goes into ``cfg.model``. Strings are parsed with the field's type."""
    names = {f.name for f in fields(cfg)}
    for key, value in overrides.items():
        if key.startswith("model."):
            sub = key[len("model."):]
            cfg.model[sub] = parse_value(key, value) if isinstance(value, str) else value
            continue
        if key not in names:
            raise ConfigError(f"unknown config key {key!r} (trainer keys: {', '.join(sorted(names))}; "
                              f"model keys go as model.<key>=value)")
        tp = _hints()[key]
        if isinstance(value, str) and str not in _allowed(tp):
            value = parse_value(key, value, tp)
        setattr(cfg, key, value)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def default_storage() -> str:
    """Absolute local storage path (a relative one would move with ``ray job submit``'s working dir)."""
    return os.path.abspath(os.environ.get("AVMOE_STORAGE", "runs"))
