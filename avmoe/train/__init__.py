"""Distributed trainer: Ray Train ``TorchTrainer`` workers running DeepSpeed (ZeRO 0-3) over the
trainable parameters of an AVMoE model, streaming shards through ``data_pipeline.ingest``.

    from avmoe.train import TrainConfig, fit, prepare
    results = fit(TrainConfig(task="ave", data="s3://bucket/shards/ave", workers=4, zero_stage=2))

Modules: ``config`` (TrainConfig), ``trainer`` (driver: checks, TorchTrainer, resume),
``loop`` (per-worker loop), ``engine`` (DeepSpeed config / init / safe loading), ``checkpoint``,
``evaluate`` (gathered exact metrics), ``ogm`` (OGM-GE), ``results`` (plots), ``cli`` (jobs).
"""

from avmoe.train.config import ConfigError, TrainConfig
from avmoe.train.trainer import fit, prepare, run_local

__all__ = ["ConfigError", "TrainConfig", "fit", "prepare", "run_local"]
