"""The ``Task``: everything the trainer, the jobs and the tools know about one task.

A task is one file in ``avmoe/tasks/`` (or any module registering into ``TASKS``) with one
class decorated by ``@register_task("name")``. The trainer (``avmoe/train``) names no task: it
asks the task object for

* its **variants** (AVS: ``s4`` / ``ms3``, chosen with ``--setting``): ``variants``,
  ``variant_option``; a task object is bound to one variant (``get_task("avs-ms3")``);
* its **data**: the ``data_pipeline`` dataset it trains on (``dataset``) and the model config
  keys the shards decide (``model_keys(manifest)``: label vocabularies, segment count, ...);
* its **model**: ``config(preset, **overrides)`` (a typed dataclass, presets ``tiny`` /
  ``paper`` / ``official``), ``build_model(cfg)``;
* its **training defaults** (the released scripts' optimiser, LR, schedule, batch, accumulation,
  epochs, early stop, seed: ``training_defaults(preset)``) and the embedded demo's schedule
  (``demo_schedule``);
* **loss / predict / metric**: ``loss(out, batch, cfg)``, ``predict(out, batch)``,
  ``metric_accumulator(cfg)``, ``primary_metric``;
* **OGM-GE**: ``ogm_scores(model, out, batch)`` (the summed true-class probabilities of its
  uni-modal estimates), or ``supports_ogm = False``, checked before any Ray resource;
* its **pictures**: ``plot_predictions(items, out_dir, title)`` (timelines, masks);
* optionally: training state outside the optimiser (``auxiliary``: per-batch updates such as an
  EMA codebook or a second optimiser, checkpointed with the run), driver-side completion of the
  run config (``complete_config``: settings read from another run, split choices), data from two
  datasets (``split_datasets``: training split from one, evaluation splits from another,
  ``--eval-data``), its own command-line flags (``extra_flags``) and an embedded demo of several
  runs (``demo_plan`` / ``demo_summary``).

::

    task = get_task("ave")                          # or "avs-ms3": the AVS task, MS3 variant
    cfg = task.config(preset="tiny", **overrides)   # typed model config
    model = task.build_model(cfg)                   # trunk + head; trainable = adapters + head
    out = model(batch)                              # dict of tensors incl. "lb_loss"
    loss, parts = task.loss(out, batch, cfg)        # scalar tensor, dict[str, float]
    preds = task.predict(out, batch)                # dict of CPU tensors
    acc = task.metric_accumulator(cfg); acc.update(preds, batch); acc.compute()
    task.training_defaults("paper")                 # OptimConfig from spec §3

Presets: "tiny" (same code, small dims, for CPU tests and the demo), "paper" (released
evaluation scripts, canonical v2 UA, eval-mode backbones) and "official" (released training
scripts: per-script UA variant, train-mode backbones with SpecAugment / mixup).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from avmoe.batch import AVBatch
from avmoe.config import ConfigError, OptimConfig, TaskConfig, apply_overrides
from avmoe.registry import Registry

PRESETS = ("tiny", "paper", "official")

TASKS: Registry = Registry("task")


def register_task(name: str):
    """Class decorator: ``@register_task("ave")`` registers a ``Task`` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        return TASKS.register(name)(cls)

    return deco


class MetricAccumulator:
    """Collects predictions batch by batch; ``compute`` returns fractions in [0, 1].

    The official metrics are not decomposable into per-batch sums (per-video means, AVSBench's
    per-test-batch F-score), so an accumulator keeps what it needs until ``compute``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, preds: dict[str, Any], batch: AVBatch) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class TaskAuxiliary:
    """Per-rank training state a task keeps outside the DeepSpeed engine and its optimiser
    (``Task.auxiliary``), e.g. an EMA-updated codebook or a variational network with its own
    optimiser. The trainer calls ``train_batch`` after the forward of every training
    micro-batch (on every rank: it may run collectives), saves ``state_dict()`` into each
    checkpoint (rank 0's copy: the state must be identical on every rank) and restores it with
    ``load_state_dict`` on resume; ``gauges()`` are exported as ``avmoe_model_stat{stat=...}``."""

    def train_batch(self, out: dict[str, Any], batch: AVBatch, loss: torch.Tensor,
                    parts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        return loss, parts

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only (it is read back with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        return {}


@dataclass
class DemoRun:
    """One run of a task's embedded demo (``Task.demo_plan``): its label (the run is named
    ``<name>-<label>``), variant, the synthetic dataset whose demo shards are ``--data`` (and
    ``--eval-data``; ``size``: its training videos when not the dataset's ``demo_size``), and
    TrainConfig overrides; an override value ``"{run:LABEL}"`` becomes the storage path of that
    earlier run of the plan."""

    label: str
    variant: str | None
    dataset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    eval_dataset: str | None = None
    size: int | None = None


class Task:
    name: str = ""  # set by @register_task
    primary_metric: str = ""
    variants: tuple[str, ...] = ()  # first = default
    variant_option: str = "variant"  # the CLI flag (--<option>) and key naming the variant
    supports_ogm: bool = False
    head: Any = None  # the head class (``factory(cfg, trunk)``) or its ``HEADS`` name
    # the embedded demo's schedule (TrainConfig overrides on top of the tiny preset)
    demo_schedule: dict[str, Any] = {}
    # the task's own command-line flags: flag -> (model config key, help text, is a local path)
    extra_flags: dict[str, tuple[str, str, bool]] = {}

    def __init__(self, variant: str | None = None) -> None:
        if self.variants:
            variant = variant or self.variants[0]
            if variant not in self.variants:
                raise ConfigError(f"{self.variant_option}: task {self.name!r} has variants "
                                  f"{', '.join(self.variants)}; got {variant!r}")
        elif variant:
            raise ConfigError(f"task {self.name!r} has no variants (got {variant!r})")
        self.variant = variant

    # ----------------------------------------------------------------- identity / data

    @property
    def full_name(self) -> str:
        """``name`` or ``name-variant``: the dataset name, metric labels, results' ``task``."""
        return f"{self.name}-{self.variant}" if self.variant else self.name

    @property
    def dataset(self) -> str:
        """The ``data_pipeline`` dataset (``DATASETS`` name) this task trains on."""
        return self.full_name

    def split_datasets(self, cfg: TaskConfig) -> dict[str, str]:
        """The dataset of the training split (``"train"``, read from ``--data``) and of the
        validation and test splits (``"eval"``, from ``--eval-data`` when given)."""
        return {"train": self.dataset, "eval": self.dataset}

    def complete_config(self, tcfg) -> None:
        """Driver side, before validation: complete the ``TrainConfig`` in place (settings
        read from another run's checkpoint, split choices); raise ``ConfigError``."""

    def auxiliary(self, module: torch.nn.Module, cfg: TaskConfig, seed: int,
                  device: torch.device) -> TaskAuxiliary | None:
        """The task's training state outside the optimiser (``TaskAuxiliary``), or None."""
        return None

    def demo_plan(self) -> list[DemoRun]:
        """The runs of the embedded demo (``python jobs/<task>.py`` with no ``--data``)."""
        return [DemoRun(self.full_name, self.variant, self.dataset, dict(self.demo_schedule))]

    def demo_summary(self, runs: list[tuple[DemoRun, dict[str, Any]]]) -> str | None:
        """A table of a several-run demo's results (None: each run's own summary)."""
        return None

    def model_keys(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Model config keys the shards decide (from a split's manifest). The segment count
        is every task's; subclasses add their vocabularies and sizes."""
        return {"num_segments": int(manifest["segments"])}

    # ----------------------------------------------------------------- config / model

    # The presets are data: override layers (``apply_overrides`` mappings) applied in order to
    # ``config_class()``: "base" (every preset: the released scripts), then the preset's own.
    config_class: type = TaskConfig
    presets: dict[str, dict[str, Any]] = {}
    training: OptimConfig = OptimConfig()  # the released scripts' schedule (spec §3)

    def preset_layers(self, preset: str) -> list[dict[str, Any]]:
        """The override layers of ``preset`` (a task with variants adds its variant's)."""
        return [self.presets.get("base", {}), self.presets.get(preset, {})]

    def make_preset(self, preset: str) -> TaskConfig:
        cfg = self.config_class()
        for layer in self.preset_layers(preset):
            apply_overrides(cfg, copy.deepcopy(layer))  # (layers hold config objects: never share them)
        return cfg

    def config(self, preset: str = "paper", **overrides: Any) -> TaskConfig:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} for task {self.name!r}; known: "
                              f"{', '.join(PRESETS)}")
        if self.variants and self.variant_option in overrides:
            raise ConfigError(f"{self.variant_option}: the variant chooses the preset; use "
                              f"get_task('{self.name}-<{'|'.join(self.variants)}>') or --{self.variant_option}")
        cfg = self.make_preset(preset)
        cfg.task, cfg.preset = self.name, preset
        return apply_overrides(cfg, overrides)

    def training_defaults(self, preset: str) -> OptimConfig:
        """The released scripts' optimisation (spec §3); every field set but ``early_stop``
        (and ``step_size``/``gamma`` without a step schedule)."""
        return copy.deepcopy(self.training)

    def build_model(self, cfg: TaskConfig) -> torch.nn.Module:
        from avmoe.models.model import AVModel

        return AVModel(cfg, head=self.head)

    # ----------------------------------------------------------------- training

    def loss(self, out: dict[str, Any], batch: AVBatch, cfg: TaskConfig) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @staticmethod
    def add_load_balance(total: torch.Tensor, parts: dict[str, torch.Tensor], out: dict[str, Any],
                         cfg: TaskConfig) -> torch.Tensor:
        """total + lb_weight * lb_loss (the term is logged whenever a router exists)."""
        lb = out.get("lb_loss")
        if lb is not None:
            parts["lb"] = lb
            if cfg.adapter.lb_weight:
                total = total + cfg.adapter.lb_weight * lb
        return total

    @staticmethod
    def _floats(parts: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in parts.items()}

    def predict(self, out: dict[str, Any], batch: AVBatch) -> dict[str, Any]:
        raise NotImplementedError

    def metric_accumulator(self, cfg: TaskConfig) -> MetricAccumulator:
        raise NotImplementedError

    def ogm_scores(self, model: torch.nn.Module, out: dict[str, Any],
                   batch: AVBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_audio, s_visual): the micro-batch's summed true-class probabilities of the
        audio-only and visual-only estimates (OGM-GE, related-methods.md §1)."""
        raise NotImplementedError(f"task {self.name!r} does not support OGM-GE")

    def example_targets(self, cfg: TaskConfig, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random but valid targets of ``batch_size`` samples for ``cfg`` (tests, benchmarks)."""
        raise NotImplementedError

    def example_batch(self, cfg: TaskConfig, batch_size: int = 2, seed: int = 0, frame_hw=(40, 48)) -> AVBatch:
        """A fixed random batch in the shard format (uint8 frames of any size, int16 audio)
        with ``example_targets``: what a model of ``cfg`` takes."""
        g = torch.Generator().manual_seed(seed)
        b, t = batch_size, cfg.num_segments
        frames = torch.randint(0, 256, (b, t, *frame_hw, 3), dtype=torch.uint8, generator=g)
        audio = (torch.randn(b, t * cfg.audio.segment_samples, generator=g) * 3000).to(torch.int16)
        return AVBatch(frames=frames, audio=audio, targets=self.example_targets(cfg, b, g),
                       keys=[f"v{i}" for i in range(b)])

    def prediction_record(self, preds: dict[str, Any], cfg: TaskConfig, vocab: dict[str, Any]) -> dict[str, Any]:
        """What ``avmoe.predict`` writes to prediction.json for one clip (``preds``: this task's
        ``predict`` output for a batch of one; ``vocab``: the shards' label vocabularies). Default:
        the raw outputs as lists."""
        return {k: v[0].tolist() if hasattr(v, "tolist") else v for k, v in preds.items()}

    def plot_prediction(self, record: dict[str, Any], frames, out_dir: str, title: str) -> list[str]:
        """The task's picture of one predicted clip (``frames``: (T, H, W, 3) uint8); returns the
        files written. Default: none."""
        return []

    def plot_predictions(self, items: list, out_dir: str, title: str) -> list[str]:
        """The task's pictures of test predictions (``items``: (key, preds, targets) in split
        order); returns the PNG paths written. Default: none."""
        return []

    # ----------------------------------------------------------------- helpers

    def with_variant(self, variant: str | None) -> "Task":
        t = copy.copy(self)
        t.__init__(variant)
        return t

    def __repr__(self) -> str:
        return f"<task {self.full_name}>"
