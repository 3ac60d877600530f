"""Experiment tracking of a run (rank 0): TensorBoard by default, MLflow and Weights & Biases as
opt-in backends where their package is installed (``telemetry.tracking=tensorboard,mlflow``).

What is logged: per optimiser step ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/samples_per_second`` (global), ``train/data_wait_ratio``; per epoch ``epoch/train_loss``,
``val/<metric>`` for every validation metric, ``router/<adapter>/<expert>`` (mean routing weight);
at the end ``test/<metric>``. The x axis is the optimiser step.

TensorBoard event files go to ``<storage>/<run>/tensorboard/`` (``tensorboard --logdir
<storage>``): written in place on a local storage path, written locally and copied there after
every epoch on object storage. MLflow logs to ``<storage>/<run>/mlruns`` when the storage is
local (``MLFLOW_TRACKING_URI`` otherwise, or to override); W&B runs in offline mode unless
``WANDB_MODE`` says otherwise, with its files in the run directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

log = logging.getLogger("avmoe.tracking")

BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> package


def parse_backends(text: str, key: str = "tracking") -> list[str]:
    """``"tensorboard,mlflow"`` -> the backends; ``"none"``/``""`` -> none. Unknown names and
    backends whose package is missing raise ConfigError naming the key and the package."""
    from avmoe.config import ConfigError

    names = [n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        if n not in BACKENDS:
            raise ConfigError(f"{key}: unknown tracking backend {n!r}; known: {', '.join(BACKENDS)}, none")
        if importlib.util.find_spec(BACKENDS[n]) is None:
            raise ConfigError(f"{key}: the {n} backend needs the {BACKENDS[n]!r} package (pip install "
                              f"{BACKENDS[n]}), or leave it out of {key}")
    return names


class Tracker:
    def __init__(self, backends: list[str], run_dir: str, run_name: str, config: Mapping[str, Any]) -> None:
        self.run_dir = run_dir.rstrip("/")
        self.remote = "://" in self.run_dir
        self._tb = self._mlflow = self._wandb = None
        self._tb_local = None
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_local = (tempfile.mkdtemp(prefix="avmoe-tb-") if self.remote
                              else os.path.join(self.run_dir, "tensorboard"))
            self._tb = SummaryWriter(self._tb_local, flush_secs=30)
            self._tb.add_text("config", "```\n" + _flat_text(config) + "\n```", 0)
        if "mlflow" in backends:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI") and not self.remote:
                mlflow.set_tracking_uri("file://" + os.path.join(self.run_dir, "mlruns"))
            mlflow.set_experiment("avmoe")
            self._mlflow = mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
        if "wandb" in backends:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project="avmoe", name=run_name, config=dict(config),
                                     dir=tempfile.mkdtemp(prefix="avmoe-wandb-") if self.remote else self.run_dir)

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None and v == v}
        if not values:
            return
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def router(self, usage: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """Mean routing weight per (adapter, expert) from ``model.router_stats()``."""
        self.scalars({f"router/{a}/expert{e}": float(w) for a, st in usage.items()
                      for e, w in enumerate(st["mean_weight"].tolist())}, step)

    def sync(self) -> None:
        """Flush; on object storage copy the TensorBoard files into the run directory."""
        if self._tb is None:
            return
        self._tb.flush()
        if self.remote:
            from data_pipeline import storage

            fs, path = storage.filesystem(self.run_dir)
            fs.put(self._tb_local, storage.join(path, "tensorboard"), recursive=True)

    def close(self) -> None:
        try:
            self.sync()
        except Exception as e:  # tracking must never lose a run's results
            log.warning("could not write TensorBoard files to %s: %s", self.run_dir, e)
        if self._tb is not None:
            self._tb.close()
            if self.remote:
                shutil.rmtree(self._tb_local, ignore_errors=True)
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flat_text(config: Mapping[str, Any]) -> str:
    return "\n".join(f"{k} = {v!r}" for k, v in sorted(_flatten(config).items()))
