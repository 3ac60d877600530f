"""The per-rank trainer: what every Ray Train worker runs (``Trainer(config, session).run()``).

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` samples per worker; an
epoch is ``batches_per_epoch // grad_accum`` steps (the leftover micro-batches of an epoch, if
any, are not read: a step never straddles two epochs, so a checkpoint always sits between
steps). DeepSpeed averages the loss over the accumulation window (the released scripts sum it;
with Adam that only changes epsilon's relative weight, spec §8.14).

Per epoch: ``train_epoch`` (``train_step`` after ``train_step``), ``validate`` with the exact
metric, ``save`` a checkpoint (named ``epoch-EEEE-step-SSSSSSS``) scored by that metric. Best =
highest validation score (never the test split), the latest of equal ones: Ray Train's own
retention order (``checkpoint.is_new_best``), so Ray never deletes it; early stopping counts the
epochs without a strictly higher score. ``finish``: restore the best checkpoint, evaluate the
test split (and with ``eval_drop``, again with that modality absent), write results.json and
the plots. A run whose training finished always ends with its results: should the best
checkpoint be gone from storage, the final weights are tested and results.json says so
(``test_fallback``).

Everything task-specific comes from the task object (``avmoe.tasks``): model, loss, metric,
OGM-GE scores, pictures. Test seams: ``make_stream`` (the data source of a split) and
``after_step`` (called after every optimiser step) are methods a test subclass overrides; the
driver runs any ``Trainer`` subclass on the workers (``fit(tcfg, trainer_cls=...)``).
"""

from __future__ import annotations

import contextlib
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
from avmoe.tracking import Tracker, parse_backends
from avmoe.train import checkpoint as ckpt_io
from avmoe.train.config import TrainConfig
from avmoe.train.engine import build_optimizer, build_scheduler, deepspeed_config, initialize, use_bf16
from avmoe.train.evaluate import EvalResult, evaluate
from avmoe.train.session import Session

log = logging.getLogger("avmoe.train")

NO_SCORE = -1e30  # score of mid-epoch checkpoints: Ray keeps the best-scored ones and the latest


@dataclass
class RunState:
    """What a checkpoint records of the loop (trainer.json) besides the engine's state."""

    epoch: int = 0  # current epoch
    batches_done: int = 0  # micro-batches of ``epoch`` consumed
    step: int = 0  # optimiser steps in total
    best_score: float | None = None
    best_checkpoint: str | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False  # early stop on validation (epochs is re-read on resume)
    # a mid-epoch checkpoint's partial train-loss sums, so that the resumed epoch reports the loss
    # of all its steps: {"world_size": W, "parts": [names], "per_rank": [[sum, count, *parts], ...]}
    epoch_loss: dict[str, Any] | None = None


# --------------------------------------------------------------------------- helpers


class Preempted(RuntimeError):
    """The worker group leaves after its preemption checkpoint (Ray Train then restarts it)."""


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


def seed_all(seed: int) -> None:
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


def _cfg_dict(cfg) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _register_plugins(plugins: dict[str, Any]) -> None:
    """The driver sends its task class and dataset object (by reference to their modules): a
    task or dataset registered on the driver at run time (a plug-in, a test's) is then known in
    this worker's registries too."""
    from avmoe.tasks import TASKS, register_task
    from data_pipeline.datasets import DATASETS

    if plugins.get("task") and plugins["task"][0] not in TASKS:
        register_task(plugins["task"][0])(plugins["task"][1])
    for ds in plugins.get("datasets") or []:
        if ds.name not in DATASETS:
            DATASETS.add(ds.name, ds)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, config: dict[str, Any], session: Session) -> None:
        self.worker_start = time.time()  # wall clock: the benchmark's time to first step
        _register_plugins(config.get("plugins") or {})
        self.tcfg = TrainConfig.from_dict(config["train"])
        self.run_name: str = config["run_name"]
        self.eval_source: str | None = config.get("eval_only")
        self.eval_only = bool(self.eval_source)
        self.session = session
        self.rank, self.world = session.rank, session.world_size
        self.state = RunState()
        from avmoe.train.progress import Progress

        self.progress = Progress(config.get("progress"), self.rank)
        self.step_times: list[float] = []
        self.wait_times: list[float] = []  # of each step: waiting for the ingest's next batch
        self.first_step_unix: float | None = None
        self.stopped_at_max_steps = False

    # ------------------------------------------------------------------ test seams

    def make_stream(self, split: str, batch_size: int, shuffle: bool, drop_last: bool):
        """The data source of one split on this rank: ``data_pipeline.ingest.ShardStream``.
        A replacement needs ``manifest``, ``num_samples``, ``batches_per_epoch``,
        ``epoch(e, start_batch)``, ``resume(state)``, ``state(e, n)`` and ``skipped_total``."""
        from data_pipeline.ingest import IngestConfig, ShardStream

        ing = self.tcfg.ingest
        cfg = IngestConfig(url=self.tcfg.paths.url(split), split=split, batch_size=batch_size, seed=self.seed,
                           shuffle=shuffle, shuffle_buffer=ing.shuffle_buffer, read_concurrency=ing.read_concurrency,
                           prefetch_batches=ing.prefetch_batches, on_error=ing.on_error,
                           decode_resources=ing.resources(), decode_on=ing.decode_on,
                           decode_threads=ing.decode_threads, drop_last=drop_last)
        return ShardStream(cfg, rank=self.rank, world_size=self.world)

    def after_step(self) -> None:
        """Called after every optimiser step (``self.state.step`` is its number)."""

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        tcfg = self.tcfg
        self.device = torch.device("cpu")
        on_gpu = tcfg.scale.gpus_per_worker > 0 and torch.cuda.is_available()
        if on_gpu:
            try:  # the GPU Ray Train assigned to this worker
                import ray.train.torch

                self.device = ray.train.torch.get_device()
            except Exception:  # LocalSession: no Ray Train context
                self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        # tiny models are dominated by op overhead; one intra-op thread per CPU the worker holds
        torch.set_num_threads(max(1, int(tcfg.scale.cpus_per_worker)))

        self.task = tcfg.get_task()
        self.cfg = tcfg.task_config()
        self.opt = tcfg.resolved_optim()
        self.seed = int(self.opt.seed)
        self.batch_size, self.grad_accum = int(self.opt.batch_size), int(self.opt.grad_accum)

        # identical initial weights on every rank (DeepSpeed does not broadcast a client model)
        seed_all(self.seed)
        model = self.task.build_model(self.cfg)
        seed_all(self.seed + 7919 * self.rank)  # per-rank stream for dropout / router noise

        self.train_stream = self.val_stream = None
        self.steps_per_epoch = 1
        if not self.eval_only:
            self.train_stream = self.make_stream(tcfg.paths.train_split, self.batch_size, True, True)
            per_epoch = self.train_stream.batches_per_epoch
            if tcfg.loop.limit_train_batches:
                per_epoch = min(per_epoch, tcfg.loop.limit_train_batches)
            self.steps_per_epoch = per_epoch // self.grad_accum
            if self.steps_per_epoch < 1:
                raise ValueError(f"{self.train_stream.num_samples} training samples give {per_epoch} batches of "
                                 f"{self.batch_size} per rank on {self.world} ranks: fewer than "
                                 f"grad_accum={self.grad_accum}")
            self.val_stream = self.make_stream(tcfg.paths.val_split, self.batch_size, False, False)
        flops = self._measure_flops(model) if tcfg.telemetry.metrics and self.val_stream is not None else None

        optimizer = build_optimizer(model.trainable_parameters(), self.opt.optimizer, self.opt.lr,
                                    self.opt.weight_decay)
        scheduler = build_scheduler(optimizer, self.opt, self.steps_per_epoch)
        ds_cfg = deepspeed_config(micro_batch=self.batch_size, grad_accum=self.grad_accum,
                                  zero_stage=tcfg.deepspeed.zero_stage, bf16=use_bf16(tcfg.deepspeed.precision, on_gpu),
                                  grad_clip=tcfg.loop.grad_clip, user=tcfg.deepspeed.overrides())
        t_init = time.perf_counter()
        self.engine, self.optimizer, self.scheduler = initialize(model, optimizer, scheduler, ds_cfg)
        self.init_seconds = time.perf_counter() - t_init
        self.module = self.engine.module

        # the task's training state outside the optimiser (identical on every rank)
        self.aux = None if self.eval_only else self.task.auxiliary(self.module, self.cfg, self.seed, self.device)

        self.train_ingest_state = None
        self._redealt = False  # set by _restore when the world size changed (elastic restart)
        self._restore()

        self.metrics = WorkerMetrics(job=self.run_name, task=self.task.full_name, rank=self.rank, node=_node_ip(),
                                     bind_address=tcfg.telemetry.metrics_address, port=tcfg.telemetry.metrics_port,
                                     sd_dir=tcfg.telemetry.metrics_sd_dir, enabled=tcfg.telemetry.metrics)
        self.metrics.start()
        self.metrics.set_flops_per_sample(flops)
        self.tracker = None
        backends = parse_backends(tcfg.telemetry.tracking)
        if backends and self.rank == 0:
            self.tracker = Tracker(backends, self.session.run_dir(), self.run_name, tcfg.to_dict())

        self.ogm = None
        if tcfg.ogm.modulation != "none" and not self.eval_only:
            from avmoe.train.ogm import OGMGE

            o = tcfg.ogm
            self.ogm = OGMGE(self.task, self.module, o.ogm_alpha, o.modulation == "ogm_ge", self.seed,
                             o.ogm_start_epoch, o.ogm_end_epoch)

    def _measure_flops(self, model) -> float | None:
        """FLOPs of one training step, on the plain module before DeepSpeed wraps it (ZeRO >= 1
        adds gradient hooks that would reduce the probe's gradients; ZeRO-3 partitions the
        weights). Shapes are all that matter, so the first validation batch stands in for a
        training batch without moving the training stream or the RNG."""
        flops = None
        probe = self.val_stream.epoch(0)
        try:
            b = next(probe, None)  # None: this rank's share of a tiny validation split is empty
            if b is None:
                raise LookupError("no validation batch on this rank")
            b = b.to(self.device)
            model.to(self.device).train()
            # (flops_per_sample restores buffers and RNG streams: training is unchanged by it)
            flops = flops_per_sample(model, lambda m, x: self.task.loss(m(x), x, self.cfg)[0], b)
        except (RuntimeError, LookupError) as e:
            # an optional gauge must not stop training: MFU is then absent for that run
            log.warning("rank %d: FLOPs per sample not measured (%s)", self.rank, str(e).splitlines()[0])
        finally:
            getattr(probe, "close", lambda: None)()
        # every rank runs the same graph: a rank whose share of a small validation split is
        # empty takes the count of one that measured
        flops = _allreduce([flops or -1.0], self.device, "max")[0]
        return flops if flops > 0 else None

    def _restore(self) -> None:
        """Resume from the run's latest checkpoint (or load ``--eval-only``'s)."""
        ctx = (self.session.open_checkpoint_path(self.eval_source) if self.eval_source
               else self.session.latest_checkpoint())
        with ctx as ckdir:
            if not ckdir:
                return
            if self.eval_only and self.tcfg.deepspeed.zero_stage != 3:
                meta = ckpt_io.load_weights(self.module, ckdir)  # the driver chose plain DP for ZeRO 0-2
            else:
                meta = ckpt_io.load(self.engine, ckdir, self.rank)
            self.state = RunState(**meta["trainer"])
            if self.aux is not None and meta.get("client", {}).get("aux") is not None:
                self.aux.load_state_dict(meta["client"]["aux"])
            self.train_ingest_state = meta["rank"].get("ingest")
            if not self.eval_only:
                _set_rng_state(meta["rank"]["rng"])
                self._redeal_after_resize()
            log.info("rank %d: resumed from %s (epoch %d, step %d, %d batches into the epoch)",
                     self.rank, ckdir, self.state.epoch, self.state.step, self.state.batches_done)

    def _redeal_after_resize(self) -> None:
        """Resumed on another world size (an elastic restart after a node loss, or a resubmit
        with other --workers; ZeRO 0): the ingest re-deals the rest of the epoch from the
        checkpoint's global position, and this rank's batch counter is set so that the epoch
        ends when that rest is consumed -- nothing of the epoch repeated or lost."""
        ing, st = self.train_ingest_state, self.state
        if not ing or ing.get("epoch") != st.epoch or not st.batches_done:
            return
        if (ing.get("world_size", self.world) == self.world and ing.get("batch_size", self.batch_size)
                == self.batch_size) or "position" not in ing:
            return
        rest = len(self.train_stream.plan_keys(st.epoch, start_sample=int(ing["position"])))  # no I/O
        total = self.steps_per_epoch * self.grad_accum
        rest -= rest % self.grad_accum  # whole optimiser steps
        log.warning("rank %d: resumed on %d workers from a checkpoint of %d: %d batches of the epoch's "
                    "rest re-dealt to this rank", self.rank, self.world, ing["world_size"], min(rest, total))
        st.batches_done = max(0, total - rest)
        self._redealt = True

    # ------------------------------------------------------------------ training

    def checkpoint_name(self) -> str:
        return f"epoch-{self.state.epoch:04d}-step-{self.state.step:07d}"

    def run(self) -> None:
        self.setup()  # (an error here ends the worker; Ray Train restarts the group)
        try:
            if not self.eval_only:
                epochs = int(self.opt.epochs)
                while self.state.epoch < epochs and not self.state.stopped_early:
                    if not self.train_epoch():
                        break
                    self.end_epoch()
                    at_max = self.tcfg.loop.max_steps is not None and self.state.step >= self.tcfg.loop.max_steps
                    if at_max and self.state.epoch < epochs and not self.state.stopped_early:
                        self.stopped_at_max_steps = True
                        break
            self.finish()
        finally:
            self.metrics.close()
            if self.tracker is not None:
                self.tracker.close()

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when ``max_steps`` stopped it midway (after
        a checkpoint)."""
        st, epoch = self.state, self.state.epoch
        self.metrics.set_epoch(epoch)
        self.engine.train()
        self.module.reset_router_stats()
        total_batches = self.steps_per_epoch * self.grad_accum
        resume = self.train_ingest_state
        if resume and resume["epoch"] == epoch and (st.batches_done or self._redealt):
            it = self.train_stream.resume(resume)
        else:
            it = self.train_stream.epoch(epoch, start_batch=st.batches_done)
        self.train_ingest_state = None
        self._restore_epoch_loss()
        self._t_last = self._t_epoch = time.perf_counter()
        self.progress.emit("epoch_start", epoch=epoch, epochs=int(self.opt.epochs), steps=self.steps_per_epoch,
                           done=st.batches_done // self.grad_accum)
        try:
            while st.batches_done < total_batches:
                self.train_step(it)
                mid = st.batches_done < total_batches
                at_max = self.tcfg.loop.max_steps is not None and st.step >= self.tcfg.loop.max_steps
                every = self.tcfg.checkpoint.checkpoint_every
                periodic = mid and (at_max or (every and st.step % every == 0))
                if periodic:
                    self.save(self.checkpoint_name(), NO_SCORE,
                              {"train_loss": self._loss_sum / max(1, self._loss_n)})
                if at_max and mid:
                    self.stopped_at_max_steps = True
                    return False
                if mid:
                    self._leave_if_preempted(saved=periodic)
        finally:
            with contextlib.suppress(Exception):
                it.close()
        return True

    def _leave_if_preempted(self, saved: bool) -> None:
        """At a mid-epoch step boundary: when any rank's node is draining (a spot preemption
        notice), every rank checkpoints now -- so at most the step in flight when the notice came
        is lost -- and the group stops with ``Preempted``; Ray Train restarts it from that
        checkpoint on the nodes that remain or replace the drained one
        (``FailureConfig.max_preemption_failures``). (At an epoch's last step ``end_epoch``
        checkpoints next; the following step boundary leaves.) One scalar all-reduce per step:
        the ranks see the notice at different steps."""
        if not self.tcfg.scale.checkpoint_on_preemption:
            return
        why = self.session.preemption_notice()
        if not _allreduce([1.0 if why else 0.0], self.device, "max")[0]:
            return
        st = self.state
        if not saved:
            self.save(self.checkpoint_name(), NO_SCORE, {"train_loss": self._loss_sum / max(1, self._loss_n),
                                                         "preempted": True})
        # Ray Train registers a report asynchronously: leaving before it did would restart the
        # group from the previous checkpoint
        self.session.wait_reports_committed()
        log.warning("rank %d: preemption notice (%s): checkpointed at step %d, leaving", self.rank,
                    why or "another rank's node", st.step)
        self.progress.emit("message", text=f"preemption notice ({why or 'another rank'}): checkpoint "
                           f"{self.checkpoint_name()} written at step {st.step}; Ray Train restarts from it")
        raise Preempted(f"rank {self.rank}: node preempted ({why or 'another rank'}); checkpoint "
                        f"{self.checkpoint_name()} written at step {st.step}")

    def _restore_epoch_loss(self) -> None:
        """This rank's train-loss sums of the epoch so far: zero at an epoch's start, else those a
        mid-epoch checkpoint carried (its own row on the same world size, bit for bit; on
        another world size rank 0 takes the global sums, which is what ``end_epoch`` adds up)."""
        self._loss_sum, self._loss_n, self._parts_sum = 0.0, 0, {}
        carried, st = self.state.epoch_loss, self.state
        st.epoch_loss = None
        if not carried or not st.batches_done:
            return
        rows = carried["per_rank"]
        if carried["world_size"] == self.world:
            row = rows[self.rank]
        elif self.rank == 0:
            row = [sum(col) for col in zip(*rows)]
        else:
            return
        self._loss_sum, self._loss_n = row[0], int(row[1])
        self._parts_sum = dict(zip(carried["parts"], row[2:]))

    def _epoch_loss_state(self) -> dict[str, Any] | None:
        """Every rank's partial train-loss sums of the current epoch (collective), or None at an
        epoch boundary."""
        if not self.state.batches_done:
            return None
        mine = [self._loss_sum, float(self._loss_n), *self._parts_sum.values()]
        flat = [0.0] * (self.world * len(mine))
        flat[self.rank * len(mine):(self.rank + 1) * len(mine)] = mine
        flat = _allreduce(flat, self.device)  # (adding zeros: every rank's row exactly)
        rows = [flat[r * len(mine):(r + 1) * len(mine)] for r in range(self.world)]
        return {"world_size": self.world, "parts": list(self._parts_sum), "per_rank": rows}

    def train_step(self, it) -> float:
        """``grad_accum`` micro-batches and one optimiser step; returns the last micro-batch's loss."""
        st, tcfg = self.state, self.tcfg
        wait, samples = 0.0, 0
        losses: list[torch.Tensor] = []  # the micro-batches' losses, left on the device until the step ends
        while True:
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            batch = batch.to(self.device)
            samples += batch.batch_size
            out = self.engine(batch)
            loss, parts = self.task.loss(out, batch, self.cfg)
            if self.aux is not None:
                loss, parts = self.aux.train_batch(out, batch, loss, parts)
            if self.ogm is not None:
                self.ogm.observe(out, batch)
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss)
            if boundary and self.ogm is not None:
                self.ogm.modulate(st.epoch, st.step)  # grads are all-reduced now (ZeRO 0)
            own_norm = self._grad_norm() if boundary and self._own_grad_norm else None
            self.engine.step()
            st.batches_done += 1
            losses.append(loss.detach())  # no host sync per micro-batch
            for k, v in parts.items():
                self._parts_sum[k] = self._parts_sum.get(k, 0.0) + v
            if boundary:
                break
        # One device->host copy per optimiser step (its loss is reported below). The values are the
        # float32 losses widened to Python floats and added one by one in micro-batch order, as
        # before: the epoch's train_loss and a checkpoint's partial sums are unchanged bit for bit.
        values = torch.cat([v.reshape(1) for v in losses]).tolist() if len(losses) > 1 else [float(losses[0])]
        for v in values:
            self._loss_sum += v
        self._loss_n += len(values)
        loss_value = values[-1]
        st.step += 1
        now = time.perf_counter()
        step_s, self._t_last = now - self._t_last, now
        self.step_times.append(step_s)
        self.wait_times.append(wait)
        if self.first_step_unix is None:
            self.first_step_unix = time.time()
        gnorm = self.engine.get_global_grad_norm()
        gnorm = own_norm if gnorm is None else gnorm
        self.metrics.observe_step(samples=samples, step_seconds=step_s, data_wait_seconds=wait, loss=loss_value,
                                  lr=self.optimizer.param_groups[0]["lr"],
                                  grad_norm=float(gnorm) if gnorm is not None else None)
        self.metrics.set_skipped_total(self.train_stream.skipped_total)
        gauges = self.aux.gauges() if self.aux is not None else {}
        if gauges:
            self.metrics.set_model_stats(gauges)
        rate, wait_ratio = samples * self.world / max(step_s, 1e-9), wait / max(step_s, 1e-9)
        self.progress.emit("step", steps=st.batches_done // self.grad_accum, loss=loss_value,
                           samples_per_s=rate, data_wait=wait_ratio)
        if self.tracker is not None:
            self.tracker.scalars({"train/loss": loss_value, "train/lr": self.optimizer.param_groups[0]["lr"],
                                  "train/grad_norm": gnorm, "train/samples_per_second": rate,
                                  "train/data_wait_ratio": wait_ratio,
                                  **{f"model/{k}": v for k, v in gauges.items()}}, st.step)
        self.after_step()
        return loss_value

    @property
    def _own_grad_norm(self) -> bool:
        """DeepSpeed reports the global grad norm under ZeRO >= 1, and at stage 0 only when it
        clips; otherwise it is computed here (the all-reduced gradients, identical on every rank)."""
        return self.tcfg.deepspeed.zero_stage == 0 and not self.tcfg.loop.grad_clip

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.module.trainable_parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def end_epoch(self) -> None:
        """Global train loss, validation, best-so-far, early stop, the epoch's checkpoint."""
        st, epoch, primary = self.state, self.state.epoch, self.task.primary_metric
        sums = _allreduce([float(self._loss_n), self._loss_sum, *self._parts_sum.values()], self.device)
        tl = [v / max(1.0, sums[0]) for v in sums[1:]]  # means over every micro-batch of every rank
        val = self.validate()
        score = float(val.metrics.get(primary, float("nan")))
        self.metrics.set_validation(primary, score)
        self.metrics.set_router_usage(self.module.router_stats())
        improved = not math.isnan(score) and (st.best_score is None or score > st.best_score)
        new_best = ckpt_io.is_new_best(score, st.best_score)  # ties: the later one, as Ray ranks them
        st.epoch += 1
        st.batches_done = 0
        row = {"epoch": epoch, "step": st.step, "train_loss": tl[0], "train_parts": dict(zip(self._parts_sum, tl[1:])),
               "val": val.metrics, "lr": self.optimizer.param_groups[0]["lr"],
               "skipped": int(_allreduce([self.train_stream.skipped_total], self.device)[0])}
        if self.ogm is not None:
            row["ogm"] = dict(self.ogm.last)
        st.history.append(row)
        name = self.checkpoint_name()
        if new_best:
            st.best_score, st.best_checkpoint, st.best_epoch = score, name, epoch
        st.bad_epochs = 0 if improved else st.bad_epochs + 1
        early_stop = self.opt.early_stop
        st.stopped_early = bool(early_stop) and st.bad_epochs >= early_stop
        if self.rank == 0:
            log.info("epoch %d: train_loss %.4f val %s=%.4f%s", epoch, tl[0], primary, score,
                     " (best)" if new_best else "")
        if self.tracker is not None:
            self.tracker.scalars({"epoch/train_loss": tl[0], **{f"val/{k}": v for k, v in val.metrics.items()}},
                                 st.step)
            self.tracker.router(self.module.router_stats(), st.step)
            self.tracker.sync()
        self.progress.emit("epoch_end", epoch=epoch, epochs=int(self.opt.epochs), step=st.step, train_loss=tl[0],
                           metric=primary, val=None if math.isnan(score) else score, best=new_best,
                           seconds=time.perf_counter() - self._t_epoch)
        self.save(name, score if not math.isnan(score) else NO_SCORE, {"train_loss": tl[0], f"val_{primary}": score})

    def validate(self, stream=None, drop: str | None = None) -> EvalResult:
        """The exact metric on ``stream`` (default: the validation split); on the test split the
        first samples keep their frames for the task's pictures."""
        keep = 6 if stream is not None and stream is not self.val_stream and self.tcfg.evaluation.plots else 0
        return evaluate(self.engine, self.task, self.cfg, stream or self.val_stream, device=self.device, drop=drop,
                        limit=self.tcfg.loop.limit_eval_batches, zero3=self.tcfg.deepspeed.zero_stage == 3,
                        keep_frames=keep)

    def save(self, dir_name: str, score: float, extra_metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        st, tcfg = self.state, self.tcfg
        st.epoch_loss = self._epoch_loss_state()
        with tempfile.TemporaryDirectory(prefix="avmoe-ckpt-") as d:
            ingest = self.train_stream.state(st.epoch, st.batches_done) if self.train_stream else None
            ckpt_io.save(self.engine, d, self.rank, trainer=st.__dict__,
                         client={"aux": self.aux.state_dict()} if self.aux is not None else None,
                         rank_state={"ingest": ingest, "rng": _rng_state()},
                         meta={"zero_stage": tcfg.deepspeed.zero_stage, "world_size": self.world,
                               "task": self.task.full_name, "run_name": self.run_name, "config": tcfg.to_dict()})
            self.session.report({**extra_metrics, "select_score": score, "epoch": st.epoch, "step": st.step,
                                 "checkpoint": dir_name}, checkpoint_dir=d, dir_name=dir_name)
        self.metrics.observe_checkpoint_save(time.perf_counter() - t0)

    # ------------------------------------------------------------------ the end

    def finish(self) -> None:
        """The best checkpoint (validation) on the test split; results.json and plots (rank 0)."""
        st, tcfg, primary = self.state, self.tcfg, self.task.primary_metric
        results: dict[str, Any] = {
            "run_name": self.run_name, "task": self.task.full_name, "primary_metric": primary,
            "config": tcfg.to_dict(), "model_config": _cfg_dict(self.cfg), "optim": self.opt.to_dict(),
            "world_size": self.world, "zero_stage": tcfg.deepspeed.zero_stage,
            # eval-only: the checkpoint's own training history is kept apart
            "history": [] if self.eval_only else st.history,
            "checkpoint_history": st.history if self.eval_only else None,
            "best": {"epoch": st.best_epoch, "checkpoint": st.best_checkpoint, f"val_{primary}": st.best_score},
            "stopped_at_max_steps": self.stopped_at_max_steps,
            "timing": {"deepspeed_init_s": self.init_seconds, "worker_start_unix": self.worker_start,
                       "first_step_unix": self.first_step_unix,
                       "median_step_s": float(np.median(self.step_times)) if self.step_times else None,
                       "steps_timed": len(self.step_times),
                       # rank 0's share of step time spent waiting for data, first step excluded
                       # (it includes the ingest's start-up)
                       "data_wait_ratio": (sum(self.wait_times[1:]) / sum(self.step_times[1:])
                                           if len(self.step_times) > 1 and sum(self.step_times[1:]) > 0 else None),
                       "median_compute_s": (float(np.median([a - b for a, b in zip(self.step_times, self.wait_times)]))
                                            if self.step_times else None)},
        }
        test_items = None
        if (tcfg.evaluation.test or self.eval_only) and not self.stopped_at_max_steps:
            tested = self.eval_source or st.best_checkpoint or self.checkpoint_name()
            if not self.eval_only and st.best_checkpoint and st.best_checkpoint != self.checkpoint_name():
                gone = self._load_best()
                if gone:
                    tested = self.checkpoint_name()
                    results["test_fallback"] = (f"the best checkpoint {st.best_checkpoint} could not be read "
                                                f"({gone}); the test split was evaluated with the final "
                                                f"weights ({tested}) instead")
                    log.warning("rank %d: %s", self.rank, results["test_fallback"])
            # (no finite validation score, best_checkpoint None: the last weights are tested)
            test_stream = self.make_stream(tcfg.paths.test_split, self.batch_size, False, False)
            test = self.validate(test_stream)
            results["test"] = test.metrics
            results["test_checkpoint"] = tested
            test_items = test.items
            drop = tcfg.evaluation.eval_drop
            if drop:
                results[f"test_drop_{drop}"] = self.validate(test_stream, drop=drop).metrics
            results["router_usage"] = {k: [round(float(x), 6) for x in v["mean_weight"].tolist()]
                                       for k, v in self.module.router_stats().items()}
            if self.tracker is not None:
                self.tracker.scalars({f"test/{k}": v for k, v in test.metrics.items()}, st.step)
        if self.rank == 0:
            self._write_results(results, test_items)
        # the driver reads results.json from storage (Ray's Result carries the last *checkpoint's* metrics)
        self.session.report({"final": True, "test": results.get("test") if self.rank == 0 else None})

    def _load_best(self) -> str | None:
        """Restore the best checkpoint; returns why it cannot be read (then nothing is loaded), on
        every rank alike (a rank that loads while another does not would hang in the collectives)."""
        with contextlib.ExitStack() as stack:
            problem = None
            try:
                d = stack.enter_context(self.session.open_checkpoint(self.state.best_checkpoint))
                ckpt_io.read_meta(d)
            except OSError as e:  # gone from storage (FileNotFoundError), unreadable
                problem = str(e)
            if _allreduce([1.0 if problem else 0.0], self.device, "max")[0]:
                return problem or "unreadable on another rank"
            ckpt_io.load(self.engine, d, self.rank)
        return None

    def _write_results(self, results: dict[str, Any], items) -> str:
        from avmoe.plots import plot_run

        with tempfile.TemporaryDirectory(prefix="avmoe-results-") as d:
            with open(os.path.join(d, "results.json"), "w") as f:
                json.dump(results, f, indent=1, default=float)
            if self.tcfg.evaluation.plots:
                try:
                    plot_run(results, items, self.task, os.path.join(d, "plots"))
                except Exception as e:  # plots must never lose a finished run's results
                    log.warning("plots failed: %s", e)
            return self.session.write_run_files(d)


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: ``config["trainer_cls"]`` (default ``Trainer``)."""
    from avmoe.console import quiet_process
    from avmoe.train.session import RaySession

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_process()  # (after Ray Train configured this worker's logging)
    (config.get("trainer_cls") or Trainer)(config, RaySession()).run()
