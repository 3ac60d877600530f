"""The driver side: check a ``TrainConfig`` against the data, then run it on Ray Train.

``prepare(tcfg)`` does every check that needs no cluster (config keys and types, the shards'
manifests: present, of this task's dataset, label vocabularies -> model sizes via
``task.model_keys``) and raises ``ConfigError`` naming the key; ``fit(tcfg)`` then runs a
``TorchTrainer`` whose workers each run a ``Trainer`` (``avmoe.train.trainer``):

* ``ScalingConfig(num_workers, use_gpu, resources_per_worker)``; gloo on CPU, NCCL on GPU;
* ``RunConfig(name, storage_path, FailureConfig(max_failures), CheckpointConfig(keep K, scored
  by the validation metric))``. Resume = run again with the same name and storage: Ray Train
  v2 hands the workers the latest checkpoint (``resume_from_checkpoint=`` raises in v2);
* ``worker_runtime_env``: ``TORCH_EXTENSIONS_DIR`` (DeepSpeed's CPU comm op is JIT-built once,
  ~40 s, and cached there), the loopback variables of an embedded run, S3 settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

from avmoe.train.config import ConfigError, TrainConfig

log = logging.getLogger("avmoe.train")


def _load_manifest(url: str, split: str) -> dict[str, Any]:
    from data_pipeline.datasets import DATASETS
    from data_pipeline.manifest import load_manifest
    from data_pipeline.sample import SampleSpec

    try:
        manifest = load_manifest(url, split)
        if manifest["dataset"] in DATASETS:  # its label_vocab, as the workers' ingest reads it
            SampleSpec.from_manifest(manifest)
        return manifest
    except Exception as e:
        raise ConfigError(f"data: {url} {split}: {e}") from None


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    """``trainer.json`` of a checkpoint (local path or any fsspec URL), as a config error."""
    from avmoe.train.checkpoint import read_meta

    try:
        return read_meta(path)
    except FileNotFoundError as e:
        raise ConfigError(f"eval_only: {e}") from None


def _eval_only_config(tcfg: TrainConfig) -> TrainConfig:
    """The model is rebuilt exactly as trained (preset, overrides, and the seed that drew any
    randomly initialised frozen weights)."""
    meta = read_checkpoint_meta(tcfg.evaluation.eval_only)["meta"]
    saved = TrainConfig.from_dict(meta["config"])
    if saved.get_task().full_name != tcfg.get_task().full_name:
        raise ConfigError(f"eval_only: the checkpoint is a {meta['task']} model; this job is "
                          f"{tcfg.get_task().full_name}")
    tcfg = dataclasses.replace(tcfg, preset=saved.preset, model=dict(saved.model))
    tcfg.optim.seed, tcfg.optim.optimizer = saved.optim.seed, saved.optim.optimizer
    tcfg.paths.data = tcfg.paths.data or saved.paths.data
    if int(meta["zero_stage"]) <= 2:
        # ZeRO 0-2 keep the whole trainable weights in one file: evaluate with plain data
        # parallelism on this run's --workers, whatever the training layout was
        tcfg.deepspeed.zero_stage = 0
    else:  # ZeRO 3 partitions the weights: the same layout as trained
        tcfg.deepspeed.zero_stage = 3
        tcfg.scale.workers = int(meta["world_size"])
        tcfg.optim.batch_size, tcfg.optim.grad_accum = saved.optim.batch_size, saved.optim.grad_accum
    return tcfg


def absolute_path(path: str) -> str:
    """A local path made absolute (workers run in another directory); a URL as it is."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _check_one_global_batch(tcfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """Every training step takes one batch per worker (drop_last): a split smaller than that
    would train on nothing."""
    batch, workers = tcfg.resolved_optim().batch_size, tcfg.scale.workers
    n = int(manifest["num_samples"])
    if n < batch * workers:
        raise ConfigError(f"batch_size: {batch} per worker x {workers} workers = {batch * workers} "
                          f"samples per step, but the {tcfg.paths.train_split} split at "
                          f"{tcfg.paths.url(tcfg.paths.train_split)} has {n}; lower --batch-size or --workers")


def prepare(tcfg: TrainConfig) -> TrainConfig:
    """Validate and complete ``tcfg`` on the driver (no Ray). Returns a new config."""
    tcfg = TrainConfig.from_dict(tcfg.to_dict())  # a private copy
    if tcfg.evaluation.eval_only:
        tcfg = _eval_only_config(tcfg)
    tcfg.get_task().complete_config(tcfg)  # (e.g. settings read from another run)
    tcfg.validate()
    task = tcfg.get_task()
    p = tcfg.paths
    for key in ("data", "eval_data"):
        if getattr(p, key):
            setattr(p, key, absolute_path(getattr(p, key)))
    splits = [p.test_split] if tcfg.evaluation.eval_only else [p.train_split, p.val_split] + (
        [p.test_split] if tcfg.evaluation.test else [])
    manifests = {s: _load_manifest(p.url(s), s) for s in splits}
    wanted = task.split_datasets(tcfg.task_config())
    for split, m in manifests.items():
        role = "train" if split == p.train_split and not tcfg.evaluation.eval_only else "eval"
        if m["dataset"] != wanted[role]:
            key = "data" if p.url(split) == p.data else "eval_data"
            raise ConfigError(f"{key}: the {split} shards at {p.url(split)} are {m['dataset']!r} data "
                              f"(manifest 'dataset'); this job {'trains on' if role == 'train' else 'evaluates on'} "
                              f"{wanted[role]!r}")
    if not tcfg.evaluation.eval_only:
        _check_one_global_batch(tcfg, manifests[p.train_split])
    from avmoe.train.resources import check_resources

    check_resources(tcfg)  # before any Ray resource: --workers this machine / cluster can hold
    derived = task.model_keys(manifests[splits[0]])
    user = tcfg.task_config()  # the user's values, parsed
    for key, value in derived.items():
        if key in tcfg.model and getattr(user, key) != value:
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
             "AVMOE_METRICS_PORT_SLOTS", "AVMOE_METRICS_SD_DIR", "AVMOE_METRICS_STRICT", "AVMOE_PEAK_FLOPS",
             "AVMOE_VERBOSE"]
    if not on_cluster():
        names += list(LOOPBACK_VARS) + ["HOME"]
    for k in names:
        if k in os.environ:  # an empty value means something too (AVMOE_METRICS_SD_DIR="": no file SD)
            env[k] = os.environ[k]
    from avmoe.console import QUIET_ENV, verbose

    if not verbose():
        env.update(QUIET_ENV)
    if not tcfg.scale.gpus_per_worker:
        env["DS_ACCELERATOR"] = "cpu"  # a CPU job on a GPU node must not pick CUDA
    from data_pipeline.storage import worker_env as storage_env

    for url in (tcfg.paths.data, tcfg.paths.eval_data):
        if url:
            env.update((storage_env(url) or {}).get("env_vars", {}))
    return env


def _plugins(tcfg: TrainConfig) -> dict[str, Any]:
    """The task class and dataset object the workers need (pickled by reference to their
    modules), so that ones registered on the driver at run time are known there too."""
    from data_pipeline.datasets import get_dataset

    task = tcfg.get_task()
    datasets = []
    for name in dict.fromkeys(task.split_datasets(tcfg.task_config()).values()):
        try:
            datasets.append(get_dataset(name))
        except KeyError:  # eval-only of a run whose dataset is not registered: the manifest says
            pass
    return {"task": (tcfg.task, type(task)), "datasets": datasets}


def storage_path(storage: str) -> str:
    return storage if "://" in storage else os.path.abspath(storage)


def fit(tcfg: TrainConfig, *, prepared: bool = False, trainer_cls=None, progress: bool = False) -> dict[str, Any]:
    """Run training (or ``eval_only``) on the current Ray cluster; returns the run's results
    (results.json's content). ``trainer_cls``: a ``Trainer`` subclass for the workers;
    ``progress``: draw rank 0's progress on this process's console (avmoe.train.progress)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from avmoe.console import verbose
    from avmoe.train.process_group import BoundStoreTorchConfig

    from avmoe.train.trainer import train_worker

    if not prepared:
        tcfg = prepare(tcfg)
    name = tcfg.run_name()
    sc = tcfg.scale
    use_gpu = sc.gpus_per_worker > 0
    resources = {"CPU": sc.cpus_per_worker, **(sc.worker_resources or {})}
    if use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    # elastic: Ray Train v2 takes a (min, max) range and re-forms the group after a node loss
    # with what the cluster then holds (the ingest re-deals the epoch's rest, trainer._restore)
    num_workers = (sc.min_workers, sc.workers) if sc.elastic else sc.workers
    from avmoe.train.progress import DriverProgress

    with (DriverProgress() if progress else contextlib.nullcontext()) as shown:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"train": tcfg.to_dict(), "run_name": name, "eval_only": tcfg.evaluation.eval_only,
                               "trainer_cls": trainer_cls, "plugins": _plugins(tcfg),
                               "progress": shown.board if shown else None},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            # the c10d rendezvous store on the node's address, not every interface
            torch_config=BoundStoreTorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=name, storage_path=storage_path(tcfg.paths.storage),
                failure_config=FailureConfig(max_failures=sc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=tcfg.checkpoint.keep_checkpoints,
                                                   checkpoint_score_attribute="select_score",
                                                   checkpoint_score_order="max"),
                worker_runtime_env={"env_vars": worker_env(tcfg)},
                logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
        )
        assert ray.is_initialized()
        trainer.fit()  # raises on failure (after max_failures restarts)
    return read_results(tcfg.paths.storage, name)


def read_results(storage: str, name: str) -> dict[str, Any]:
    """results.json of run ``name`` (rank 0 writes it into the run directory in storage)."""
    from data_pipeline import storage as st

    fs, base = st.filesystem(storage_path(storage))
    with fs.open(st.join(st.join(base, name), "results.json"), "rb") as f:
        results = json.load(f)
    results["results_dir"] = st.join(storage_path(storage), name)
    return results


def run_local(tcfg: TrainConfig, session=None, trainer_cls=None) -> dict[str, Any]:
    """The same trainer in this process (world size 1, no Ray Train): tests, the telemetry
    demo and the bare benchmark. ``tcfg`` must be prepared (or fit a ``trainer_cls`` whose
    ``make_stream`` needs no shards)."""
    from avmoe.train.session import LocalSession, init_local_process_group
    from avmoe.train.trainer import Trainer

    init_local_process_group()
    name = tcfg.run_name()
    session = session or LocalSession(storage_path(tcfg.paths.storage), name)
    (trainer_cls or Trainer)({"train": tcfg.to_dict(), "run_name": name,
                              "eval_only": tcfg.evaluation.eval_only}, session).run()
    return read_results(tcfg.paths.storage, name)
