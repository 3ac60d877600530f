"""The Task interface the trainer uses; each task contributes config, head, loss, metric.

::

    task = get_task("ave")
    cfg = task.config(preset="tiny", **overrides)   # typed dataclass (avmoe/config.py)
    model = task.build_model(cfg)                   # trunk + head; trainable = adapters + head
    out = model(batch)                              # dict of tensors incl. "lb_loss"
    loss, parts = task.loss(out, batch, cfg)        # scalar tensor, dict[str, float]
    preds = task.predict(out, batch)                # dict of CPU tensors
    acc = task.metric_accumulator(cfg); acc.update(preds, batch); acc.compute()
    task.optimizer_defaults(cfg)                    # from spec §3

Presets: "tiny" (same code, small dims, for CPU tests), "paper" (released evaluation scripts,
canonical v2 UA, eval-mode backbones, validation-split selection) and "official" (released
training scripts: per-script UA variant, train-mode backbones with SpecAugment / mixup, and
the scripts' selection split).
"""

from __future__ import annotations

from typing import Any

import torch

from avmoe.batch import AVBatch
from avmoe.config import TaskConfig, apply_overrides

PRESETS = ("tiny", "paper", "official")


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


class Task:
    name: str = ""
    config_cls: type[TaskConfig] = TaskConfig
    primary_metric: str = ""
    # overrides that choose the preset's variant before the others are applied (AVS: setting)
    preset_keys: tuple[str, ...] = ()

    # ----------------------------------------------------------------- config / model

    def make_preset(self, preset: str, **variant: Any) -> TaskConfig:
        raise NotImplementedError

    def config(self, preset: str = "paper", **overrides: Any) -> TaskConfig:
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r} for task {self.name!r}; known: {', '.join(PRESETS)}")
        variant = {k: overrides.pop(k) for k in self.preset_keys if k in overrides}
        cfg = self.make_preset(preset, **variant)
        cfg.task, cfg.preset = self.name, preset
        return apply_overrides(cfg, overrides)

    def build_model(self, cfg: TaskConfig) -> torch.nn.Module:
        from avmoe.models.model import AVModel

        return AVModel(cfg, head=self.name)

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

    def optimizer_defaults(self, cfg: TaskConfig) -> dict[str, Any]:
        o = cfg.optim
        scheduler = ({"name": "step", "step_size": o.step_size, "gamma": o.gamma}
                     if o.scheduler == "step" else {"name": "none"})
        return {
            "optimizer": o.optimizer, "lr": o.lr, "weight_decay": o.weight_decay,
            "scheduler": scheduler, "epochs": o.epochs, "batch_size": o.batch_size,
            "grad_accumulation": o.grad_accum, "early_stop": o.early_stop, "seed": o.seed,
            "select_split": o.select_split, "primary_metric": self.primary_metric,
        }
