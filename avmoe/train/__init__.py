"""Distributed trainer: Ray Train ``TorchTrainer`` workers running DeepSpeed (ZeRO 0-3) over the
trainable parameters of an AVMoE model, streaming shards through ``data_pipeline.ingest``.

    from avmoe.train import TrainConfig, fit
    results = fit(TrainConfig.of(task=name, data="s3://bucket/shards/" + name, workers=4, zero_stage=2))

Modules: ``config`` (TrainConfig, in sections), ``driver`` (checks, TorchTrainer, resume),
``trainer`` (the per-rank ``Trainer``), ``engine`` (DeepSpeed config / init / safe loading),
``checkpoint``, ``evaluate`` (gathered exact metrics), ``ogm`` (OGM-GE), ``session`` (Ray Train
or in-process), ``cli`` (the jobs). Nothing here names a task: see ``avmoe.tasks``.
"""

from avmoe.train.config import ConfigError, TrainConfig
from avmoe.train.driver import fit, prepare, run_local
from avmoe.train.trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "fit", "prepare", "run_local"]
