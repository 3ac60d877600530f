"""The driver side: check a ``TrainConfig`` against the data, then run it on Ray Train.

``prepare(tcfg)`` does every check that needs no cluster (config keys and types, the shards'
manifests: present, of this task, label vocabularies -> model sizes) and raises
``ConfigError`` naming the key; ``fit(tcfg)`` then runs a ``TorchTrainer``:

* ``ScalingConfig(num_workers, use_gpu, resources_per_worker)``; gloo on CPU, NCCL on GPU;
* ``RunConfig(name, storage_path, FailureConfig(max_failures), CheckpointConfig(keep K, scored
  by the validation metric))``. Resume = run again with the same name and storage: Ray Train
  v2 hands the workers the latest checkpoint (``resume_from_checkpoint=`` raises in v2);
* ``worker_runtime_env``: ``TORCH_EXTENSIONS_DIR`` (DeepSpeed's CPU comm op is JIT-built once,
  ~40 s, and cached there), the loopback variables of an embedded run, S3 settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from avmoe.train.config import ConfigError, TrainConfig

log = logging.getLogger("avmoe.train")


def data_model_keys(task: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Model config keys the shards decide (label vocabularies, segment count, feature size)."""
    vocab = manifest.get("label_vocab") or {}
    out: dict[str, Any] = {"num_segments": int(manifest["segments"])}
    if task in ("ave", "avvp") and "classes" in vocab:
        out["num_classes"] = len(vocab["classes"])
    if task == "avvp":
        # the shards' r2p1d.npy are (T, 512) R(2+1)D-18 features (data_pipeline/SCHEMA.md); the
        # tiny preset's own st_dim is for hand-made test batches
        out["st_dim"] = int(manifest.get("feature_dim", 512))
    if task == "avqa":
        if "question_tokens" in vocab:
            out["vocab_size"] = len(vocab["question_tokens"])
        if "answers" in vocab:
            out["num_answers"] = len(vocab["answers"])
        if "max_question_len" in vocab:
            out["max_question_len"] = int(vocab["max_question_len"])
    return out


def _load_manifest(url: str, split: str) -> dict[str, Any]:
    from data_pipeline.ingest import load_manifest

    try:
        return load_manifest(url, split)
    except Exception as e:
        raise ConfigError(f"data: {e}") from None


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    """``trainer.json`` of a checkpoint (local path or any fsspec URL), as a config error."""
    from avmoe.train.checkpoint import read_meta

    try:
        return read_meta(path)
    except FileNotFoundError as e:
        raise ConfigError(f"eval_only: {e}") from None


def prepare(tcfg: TrainConfig) -> TrainConfig:
    """Validate and complete ``tcfg`` on the driver (no Ray). Returns a new config."""
    tcfg = dataclasses.replace(tcfg, model=dict(tcfg.model))
    if tcfg.eval_only:
        meta = read_checkpoint_meta(tcfg.eval_only)["meta"]
        saved = TrainConfig.from_dict(meta["config"])
        if saved.task != tcfg.task or (saved.setting or None) != (tcfg.setting or None) and tcfg.task == "avs":
            raise ConfigError(f"eval_only: the checkpoint is a {meta['task']} model; this job is "
                              f"{tcfg.task_name}")
        # the model is rebuilt exactly as trained (preset, overrides, and the seed that drew any
        # randomly initialised frozen weights)
        tcfg = dataclasses.replace(tcfg, preset=saved.preset, model=dict(saved.model), seed=saved.seed,
                                   optimizer=saved.optimizer, data=tcfg.data or saved.data)
        if int(meta["zero_stage"]) <= 2:
            # ZeRO 0-2 keep the whole trainable weights in one file: evaluate with plain data
            # parallelism on this run's --workers, whatever the training layout was
            tcfg = dataclasses.replace(tcfg, zero_stage=0)
        else:  # ZeRO 3 partitions the weights: the same layout as trained
            tcfg = dataclasses.replace(tcfg, zero_stage=3, workers=int(meta["world_size"]),
                                       batch_size=saved.batch_size, grad_accum=saved.grad_accum)
    tcfg.validate()
    splits = [tcfg.test_split] if tcfg.eval_only else [tcfg.train_split, tcfg.val_split] + (
        [tcfg.test_split] if tcfg.test else [])
    if tcfg.stream_factory:  # tests' in-memory data: no manifests to check
        return tcfg
    manifests = {s: _load_manifest(tcfg.data, s) for s in splits}
    for split, m in manifests.items():
        if m["dataset"] != tcfg.task_name:
            raise ConfigError(f"data: the {split} shards at {tcfg.data} are {m['dataset']!r} data "
                              f"(manifest 'dataset'); this job trains {tcfg.task_name!r}")
    derived = data_model_keys(tcfg.task, manifests[splits[0]])
    for key, value in derived.items():
        if key in tcfg.model and tcfg.model[key] != value:
            raise ConfigError(f"model.{key}={tcfg.model[key]!r} disagrees with the shards "
                              f"({value!r} in {splits[0]}.manifest.json)")
        tcfg.model[key] = value
    tcfg.validate()  # the model config again, with the data's sizes
    return tcfg


def worker_env(tcfg: TrainConfig) -> dict[str, str]:
    env: dict[str, str] = {}
    from avmoe.ray_env import LOOPBACK_VARS, on_cluster

    # the telemetry settings of the driver reach the workers (where WorkerMetrics reads them)
    names = ["TORCH_EXTENSIONS_DIR", "AVMOE_CACHE_DIR", "AVMOE_METRICS", "AVMOE_METRICS_ADDR", "AVMOE_METRICS_PORT",
             "AVMOE_METRICS_PORT_SLOTS", "AVMOE_METRICS_SD_DIR", "AVMOE_METRICS_STRICT", "AVMOE_PEAK_FLOPS"]
    if not on_cluster():
        names += list(LOOPBACK_VARS) + ["HOME"]
    for k in names:
        if k in os.environ:  # an empty value means something too (AVMOE_METRICS_SD_DIR="": no file SD)
            env[k] = os.environ[k]
    if not tcfg.gpus_per_worker:
        env["DS_ACCELERATOR"] = "cpu"  # a CPU job on a GPU node must not pick CUDA
    if tcfg.data:
        from data_pipeline.ingest import worker_env as ingest_env

        env.update((ingest_env(tcfg.data) or {}).get("env_vars", {}))
    return env


def storage_path(storage: str) -> str:
    return storage if "://" in storage else os.path.abspath(storage)


def fit(tcfg: TrainConfig, *, prepared: bool = False) -> dict[str, Any]:
    """Run training (or ``eval_only``) on the current Ray cluster; returns the run's results
    (results.json's content)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from avmoe.train.loop import train_worker

    if not prepared:
        tcfg = prepare(tcfg)
    name = tcfg.run_name()
    use_gpu = tcfg.gpus_per_worker > 0
    resources = {"CPU": tcfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = tcfg.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": tcfg.to_dict(), "run_name": name, "eval_only": tcfg.eval_only},
        scaling_config=ScalingConfig(num_workers=tcfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path(tcfg.storage),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints,
                                               checkpoint_score_attribute="select_score",
                                               checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": worker_env(tcfg)}),
    )
    assert ray.is_initialized()
    trainer.fit()  # raises on failure (after max_failures restarts)
    return read_results(tcfg.storage, name)


def read_results(storage: str, name: str) -> dict[str, Any]:
    """results.json of run ``name`` (rank 0 writes it into the run directory in storage)."""
    from data_pipeline import storage as st

    fs, base = st.filesystem(storage_path(storage))
    with fs.open(st.join(st.join(base, name), "results.json"), "rb") as f:
        results = json.load(f)
    results["results_dir"] = st.join(storage_path(storage), name)
    return results


def run_local(tcfg: TrainConfig, session=None) -> dict[str, Any]:
    """The same loop in this process (world size 1, no Ray Train): tests and the bare benchmark."""
    from avmoe.train.loop import run_worker
    from avmoe.train.session import LocalSession, init_local_process_group

    init_local_process_group()
    name = tcfg.run_name()
    session = session or LocalSession(storage_path(tcfg.storage), name)
    run_worker({"train": tcfg.to_dict(), "run_name": name, "eval_only": tcfg.eval_only}, session)
    return read_results(tcfg.storage, name)
