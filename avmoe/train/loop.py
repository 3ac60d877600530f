"""The per-worker training loop (what every Ray Train worker runs).

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` samples per worker; an
epoch is ``batches_per_epoch // grad_accum`` steps (the leftover micro-batches of an epoch, if
any, are not read: a step never straddles two epochs, so a checkpoint always sits between
steps). DeepSpeed averages the loss over the accumulation window (the released scripts sum it;
with Adam that only changes epsilon's relative weight, spec §8.14).

Per epoch: train, evaluate on the validation split with the exact metric, report a checkpoint
(named ``epoch-EEEE-step-SSSSSSS``) scored by that metric. Best = highest validation score
(never the test split). At the end: restore the best checkpoint, evaluate the test split
(and with ``eval_drop``, again with that modality absent), write results.json and the plots.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from avmoe.telemetry import WorkerMetrics, flops_per_sample
from avmoe.train import checkpoint as ckpt_io
from avmoe.train.config import TrainConfig, parse_fault
from avmoe.train.engine import (build_optimizer, build_scheduler, deepspeed_config, initialize, use_bf16)
from avmoe.train.evaluate import evaluate
from avmoe.train.session import Session

log = logging.getLogger("avmoe.train")

NO_SCORE = -1e30  # score of mid-epoch checkpoints: Ray keeps the best-scored ones and the latest


@dataclass
class RunState:
    epoch: int = 0  # current epoch
    batches_done: int = 0  # micro-batches of ``epoch`` consumed
    step: int = 0  # optimiser steps in total
    best_score: float | None = None
    best_checkpoint: str | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False  # early stop on validation (epochs is re-read on resume)


# --------------------------------------------------------------------------- data source


def make_stream(tcfg: TrainConfig, split: str, rank: int, world: int, batch_size: int, shuffle: bool,
                seed: int, drop_last: bool):
    """The data source of one split on one rank: ``data_pipeline.ingest.ShardStream`` or, for
    tests, ``tcfg.stream_factory`` ("module:function" with this signature) -- anything with
    ``task``, ``manifest``, ``num_samples``, ``batches_per_epoch``, ``epoch(e, start_batch)``,
    ``resume(state)``, ``state(e, n)`` and ``skipped_total``."""
    if tcfg.stream_factory:
        mod, fn = tcfg.stream_factory.split(":")
        return getattr(importlib.import_module(mod), fn)(tcfg, split, rank, world, batch_size, shuffle, seed,
                                                         drop_last)
    from data_pipeline.ingest import IngestConfig, ShardStream

    cfg = IngestConfig(url=tcfg.data, split=split, batch_size=batch_size, seed=seed, shuffle=shuffle,
                       shuffle_buffer=tcfg.shuffle_buffer, read_concurrency=tcfg.read_concurrency,
                       prefetch_batches=tcfg.prefetch_batches, on_error=tcfg.on_error,
                       decode_resources=({"CPU": tcfg.decode_cpus} if tcfg.decode_cpus is not None else None),
                       drop_last=drop_last)
    return ShardStream(cfg, rank=rank, world_size=world)


# --------------------------------------------------------------------------- helpers


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # not inside Ray (LocalSession)
        return "127.0.0.1"


def _allreduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Element-wise across ranks: "sum", "mean" or "max" (float64, on ``device``: NCCL needs the GPU)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t.tolist()


# --------------------------------------------------------------------------- the loop


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    from avmoe.train.session import RaySession

    run_worker(config, RaySession())


def run_worker(config: dict[str, Any], session: Session) -> None:
    worker_start = time.time()  # wall clock: the benchmark's time to first step
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tcfg = TrainConfig.from_dict(config["train"])
    run_name = config["run_name"]
    rank, world = session.rank, session.world_size
    on_gpu = tcfg.gpus_per_worker > 0 and torch.cuda.is_available()
    device = torch.device("cpu")
    if on_gpu:
        try:  # the GPU Ray Train assigned to this worker
            import ray.train.torch

            device = ray.train.torch.get_device()
        except Exception:  # LocalSession: no Ray Train context
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    # tiny models are dominated by op overhead; one intra-op thread per CPU the worker holds
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))

    from avmoe.tasks import get_task

    task = get_task(tcfg.task)
    cfg = tcfg.task_config()
    opt = tcfg.optim(cfg)
    seed = int(opt["seed"])
    batch_size, grad_accum = int(opt["batch_size"]), int(opt["grad_accumulation"])
    eval_only = bool(config.get("eval_only"))

    # identical initial weights on every rank (DeepSpeed does not broadcast a client model)
    _seed_all(seed)
    model = task.build_model(cfg)
    _seed_all(seed + 7919 * rank)  # per-rank stream for dropout / router noise

    train_stream = None
    steps_per_epoch = 1
    if not eval_only:
        train_stream = make_stream(tcfg, tcfg.train_split, rank, world, batch_size, True, seed, True)
        per_epoch = train_stream.batches_per_epoch
        if tcfg.limit_train_batches:
            per_epoch = min(per_epoch, tcfg.limit_train_batches)
        steps_per_epoch = per_epoch // grad_accum
        if steps_per_epoch < 1:
            raise ValueError(f"{train_stream.num_samples} training samples give {per_epoch} batches of "
                             f"{batch_size} per rank on {world} ranks: fewer than grad_accum={grad_accum}")

    val_stream = None
    if not eval_only:
        val_stream = make_stream(tcfg, tcfg.val_split, rank, world, batch_size, False, seed, False)
    flops = None
    if tcfg.metrics and val_stream is not None:
        # FLOPs of one training step, on the plain module before DeepSpeed wraps it (ZeRO >= 1
        # adds gradient hooks that would reduce the probe's gradients; ZeRO-3 partitions the
        # weights). Shapes are all that matter, so the first validation batch stands in for a
        # training batch without moving the training stream or the RNG.
        probe = val_stream.epoch(0)
        try:
            b = next(probe, None)  # None: this rank's share of a tiny validation split is empty
            if b is None:
                raise LookupError("no validation batch on this rank")
            b = b.to(device)
            model.to(device).train()
            # (flops_per_sample restores buffers and RNG streams: training is unchanged by it)
            flops = flops_per_sample(model, lambda m, x: task.loss(m(x), x, cfg)[0], b)
        except (RuntimeError, LookupError) as e:
            # an optional gauge must not stop training: MFU is then absent for that run
            log.warning("rank %d: FLOPs per sample not measured (%s)", rank, str(e).splitlines()[0])
        finally:
            getattr(probe, "close", lambda: None)()
        # every rank runs the same graph: a rank whose share of a small validation split is
        # empty takes the count of one that measured
        flops = _allreduce([flops or -1.0], device, "max")[0]
        flops = flops if flops > 0 else None
    optimizer = build_optimizer(model.trainable_parameters(), opt["optimizer"], opt["lr"], opt["weight_decay"])
    scheduler = build_scheduler(optimizer, opt["scheduler"], steps_per_epoch)
    bf16 = use_bf16(tcfg.precision, on_gpu)
    ds_cfg = deepspeed_config(micro_batch=batch_size, grad_accum=grad_accum, zero_stage=tcfg.zero_stage,
                              bf16=bf16, grad_clip=tcfg.grad_clip, user=tcfg.deepspeed_overrides())
    t_init = time.perf_counter()
    engine, optimizer, scheduler = initialize(model, optimizer, scheduler, ds_cfg)
    init_seconds = time.perf_counter() - t_init
    module = engine.module

    state = RunState()
    train_ingest_state = None
    source = config.get("eval_only")
    ctx = session.open_checkpoint_path(source) if source else session.latest_checkpoint()
    with ctx as ckdir:
        if ckdir:
            if eval_only and tcfg.zero_stage != 3:  # prepare() chose plain DP for a ZeRO 0-2 checkpoint
                meta = ckpt_io.load_weights(module, ckdir)
            else:
                meta = ckpt_io.load(engine, ckdir, rank)
            state = RunState(**meta["trainer"])
            train_ingest_state = meta["rank"].get("ingest")
            if not eval_only:
                _set_rng_state(meta["rank"]["rng"])
            log.info("rank %d: resumed from %s (epoch %d, step %d, %d batches into the epoch)",
                     rank, ckdir, state.epoch, state.step, state.batches_done)

    metrics = WorkerMetrics(job=run_name, task=tcfg.task_name, rank=rank, node=_node_ip(),
                            bind_address=tcfg.metrics_address, port=tcfg.metrics_port, enabled=tcfg.metrics)
    metrics.start()
    metrics.set_flops_per_sample(flops)

    def run_eval(stream, drop=None):
        return evaluate(engine, task, cfg, stream, device=device, drop=drop, limit=tcfg.limit_eval_batches,
                        zero3=tcfg.zero_stage == 3)

    ogm = None
    if tcfg.modulation != "none" and not eval_only:
        from avmoe.train.ogm import OGMGE

        ogm = OGMGE(tcfg.task, module, tcfg.ogm_alpha, tcfg.modulation == "ogm_ge", seed,
                    tcfg.ogm_start_epoch, tcfg.ogm_end_epoch)

    fault = parse_fault(tcfg.fault_injection) if tcfg.fault_injection else None
    early_stop = opt.get("early_stop")
    primary = task.primary_metric
    epochs = int(opt["epochs"])
    step_times: list[float] = []
    first_step_unix = None
    stopped_at_max_steps = False

    def save(dir_name: str, score: float, extra_metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="avmoe-ckpt-") as d:
            ingest = train_stream.state(state.epoch, state.batches_done) if train_stream else None
            ckpt_io.save(engine, d, rank, trainer=state.__dict__, rank_state={"ingest": ingest, "rng": _rng_state()},
                         meta={"zero_stage": tcfg.zero_stage, "world_size": world, "task": tcfg.task_name,
                               "run_name": run_name, "config": tcfg.to_dict()})
            session.report({**extra_metrics, "select_score": score, "epoch": state.epoch, "step": state.step,
                            "checkpoint": dir_name}, checkpoint_dir=d, dir_name=dir_name)
        metrics.observe_checkpoint_save(time.perf_counter() - t0)

    def ckpt_name() -> str:
        return f"epoch-{state.epoch:04d}-step-{state.step:07d}"

    if not eval_only:
        while state.epoch < epochs and not state.stopped_early:
            epoch = state.epoch
            metrics.set_epoch(epoch)
            engine.train()
            module.reset_router_stats()
            total_batches = steps_per_epoch * grad_accum
            if train_ingest_state and train_ingest_state["epoch"] == epoch and state.batches_done:
                it = train_stream.resume(train_ingest_state)
            else:
                it = train_stream.epoch(epoch, start_batch=state.batches_done)
            train_ingest_state = None
            loss_sum, loss_n, parts_sum = 0.0, 0, {}
            t_last = time.perf_counter()
            wait = 0.0
            samples = 0
            while state.batches_done < total_batches:
                t0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t0
                batch = batch.to(device)
                samples += batch.batch_size
                out = engine(batch)
                loss, parts = task.loss(out, batch, cfg)
                if ogm is not None:
                    ogm.observe(out, batch)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.backward(loss)
                if boundary and ogm is not None:
                    ogm.modulate(epoch, state.step)  # grads are all-reduced now (ZeRO 0)
                engine.step()
                state.batches_done += 1
                loss_value = float(loss.detach())  # one host sync per micro-batch
                loss_sum += loss_value
                loss_n += 1
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                if not boundary:
                    continue
                state.step += 1
                now = time.perf_counter()
                step_s = now - t_last
                t_last = now
                step_times.append(step_s)
                if first_step_unix is None:
                    first_step_unix = time.time()
                gnorm = engine.get_global_grad_norm() if tcfg.grad_clip else None
                lr = optimizer.param_groups[0]["lr"]
                metrics.observe_step(samples=samples, step_seconds=step_s, data_wait_seconds=wait,
                                     loss=loss_value, lr=lr,
                                     grad_norm=float(gnorm) if gnorm is not None else None)
                metrics.set_skipped_total(train_stream.skipped_total)
                wait, samples = 0.0, 0
                if fault and state.step == fault[0] and rank == fault[1] and not os.path.exists(fault[2]):
                    open(fault[2], "w").close()
                    log.error("fault injection: rank %d exits at step %d", rank, state.step)
                    os._exit(17)
                at_max = tcfg.max_steps is not None and state.step >= tcfg.max_steps
                mid = state.batches_done < total_batches
                if mid and (at_max or (tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0)):
                    save(ckpt_name(), NO_SCORE, {"train_loss": loss_sum / max(1, loss_n)})
                if at_max and mid:
                    stopped_at_max_steps = True
                    break
            with contextlib.suppress(Exception):
                it.close()
            if stopped_at_max_steps:
                break
            # ---- end of epoch: global train loss, validation, checkpoint
            tl = _allreduce([loss_sum / max(1, loss_n)] + [v / max(1, loss_n) for v in parts_sum.values()],
                            device, "mean")
            train_parts = dict(zip(parts_sum.keys(), tl[1:]))
            val = run_eval(val_stream)
            score = float(val.metrics.get(primary, float("nan")))
            metrics.set_validation(primary, score)
            metrics.set_router_usage(module.router_stats())
            improved = not math.isnan(score) and (state.best_score is None or score > state.best_score)
            state.epoch += 1
            state.batches_done = 0
            row = {"epoch": epoch, "step": state.step, "train_loss": tl[0], "train_parts": train_parts,
                   "val": val.metrics, "lr": optimizer.param_groups[0]["lr"],
                   "skipped": int(_allreduce([train_stream.skipped_total], device)[0])}
            if ogm is not None:
                row["ogm"] = dict(ogm.last)
            state.history.append(row)
            name = ckpt_name()
            if improved:
                state.best_score, state.best_checkpoint, state.best_epoch = score, name, epoch
                state.bad_epochs = 0
            else:
                state.bad_epochs += 1
            state.stopped_early = bool(early_stop) and state.bad_epochs >= early_stop
            at_max = tcfg.max_steps is not None and state.step >= tcfg.max_steps
            if rank == 0:
                log.info("epoch %d: train_loss %.4f val %s=%.4f%s", epoch, tl[0], primary, score,
                         " (best)" if improved else "")
            save(name, score if not math.isnan(score) else NO_SCORE,
                 {"train_loss": tl[0], f"val_{primary}": score})
            if at_max and state.epoch < epochs and not state.stopped_early:
                stopped_at_max_steps = True
                break

    # ---- final evaluation: best checkpoint (validation) on the test split
    results: dict[str, Any] = {"run_name": run_name, "task": tcfg.task_name, "primary_metric": primary,
                               "config": tcfg.to_dict(), "model_config": _cfg_dict(cfg), "optim": opt,
                               "world_size": world, "zero_stage": tcfg.zero_stage,
                               # eval-only: the checkpoint's own training history is kept apart
                               "history": [] if eval_only else state.history,
                               "checkpoint_history": state.history if eval_only else None,
                               "best": {"epoch": state.best_epoch, "checkpoint": state.best_checkpoint,
                                        f"val_{primary}": state.best_score},
                               "stopped_at_max_steps": stopped_at_max_steps}
    results["timing"] = {"deepspeed_init_s": init_seconds, "worker_start_unix": worker_start,
                         "first_step_unix": first_step_unix,
                         "median_step_s": float(np.median(step_times)) if step_times else None,
                         "steps_timed": len(step_times)}
    test_items = None
    if (tcfg.test or eval_only) and not stopped_at_max_steps:
        if not eval_only and state.best_checkpoint and state.best_checkpoint != ckpt_name():
            with session.open_checkpoint(state.best_checkpoint) as d:
                ckpt_io.load(engine, d, rank)
        # (no finite validation score, best_checkpoint None: the last weights are tested)
        test_stream = make_stream(tcfg, tcfg.test_split, rank, world, batch_size, False, seed, False)
        test = run_eval(test_stream)
        results["test"] = test.metrics
        results["test_checkpoint"] = source or state.best_checkpoint or ckpt_name()
        test_items = test.items
        if tcfg.eval_drop:
            drop = run_eval(test_stream, drop=tcfg.eval_drop)
            results[f"test_drop_{tcfg.eval_drop}"] = drop.metrics
        results["router_usage"] = _router_usage(module)
    if rank == 0:
        _write_results(session, results, tcfg, test_items, task, cfg)
    # the driver reads results.json from storage (Ray's Result carries the last *checkpoint's* metrics)
    session.report({"final": True, "test": results.get("test") if rank == 0 else None})
    metrics.close()
    if ogm is not None:
        ogm.close()


def _router_usage(module) -> dict[str, list[float]]:
    return {k: [round(float(x), 6) for x in v["mean_weight"].tolist()] for k, v in module.router_stats().items()}


def _cfg_dict(cfg) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _write_results(session: Session, results: dict[str, Any], tcfg: TrainConfig, items, task, cfg) -> str:
    from avmoe.train import results as res

    with tempfile.TemporaryDirectory(prefix="avmoe-results-") as d:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
        if tcfg.plots:
            try:
                res.plot_all(results, items, task, cfg, os.path.join(d, "plots"))
            except Exception as e:  # plots must never lose a finished run's results
                log.warning("plots failed: %s", e)
        return session.write_run_files(d)
