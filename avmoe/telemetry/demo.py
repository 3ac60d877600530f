"""A small instrumented training loop: the reference for how a trainer feeds WorkerMetrics, and
the live local run behind ``python -m avmoe.telemetry.render --demo`` and the telemetry tests.

It is a real loop (Adam on the trainable parameters of a task model, real forward/backward,
real ``torch.save`` checkpoints, real validation metric), just without Ray or sharded data.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .flops import flops_per_sample
from .worker import WorkerMetrics


def run_instrumented_loop(metrics: WorkerMetrics, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                          batches: Iterator[Any], steps: int, lr: float = 1e-3,
                          validate: Callable[[], tuple[str, float]] | None = None,
                          steps_per_epoch: int = 5, checkpoint_every: int = 5,
                          checkpoint_dir: str | None = None, stop: threading.Event | None = None,
                          on_step: Callable[[int], None] | None = None) -> int:
    """Train ``steps`` steps feeding ``metrics`` the way a trainer should; returns steps done.

    Timing convention (see WorkerMetrics.observe_step): the step clock runs from the end of the
    previous step to the end of this one, and the data wait is the time spent in ``next(batches)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    ckpt_dir = checkpoint_dir or tempfile.mkdtemp(prefix="avmoe-demo-ckpt-")
    done = 0
    last = time.perf_counter()
    for step in range(steps):
        if stop is not None and stop.is_set():
            break
        t_wait = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t_wait
        if step == 0:
            # once, on the real graph, before the first optimizer step (contract: trainer does the same)
            metrics.set_flops_per_sample(flops_per_sample(model, loss_fn, batch))
            last = time.perf_counter()  # the measurement is not part of the step time
            wait = 0.0
        if step % steps_per_epoch == 0:
            metrics.set_epoch(step // steps_per_epoch)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf"))
        opt.step()
        cur_lr = sched.get_last_lr()[0]
        sched.step()
        now = time.perf_counter()
        metrics.observe_step(samples=batch.batch_size, step_seconds=now - last, data_wait_seconds=wait,
                             loss=loss.detach(), lr=cur_lr, grad_norm=gnorm)
        metrics.set_router_usage(model.router_stats())
        model.reset_router_stats()
        done += 1
        if checkpoint_every and done % checkpoint_every == 0:
            t0 = time.perf_counter()
            torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                       os.path.join(ckpt_dir, f"step{done}.pt"))
            metrics.observe_checkpoint_save(time.perf_counter() - t0)
            if validate is not None:
                name, value = validate()
                metrics.set_validation(name, value)
                model.train()
        if on_step is not None:
            on_step(done)
        last = time.perf_counter()
    return done


def tiny_ave_setup(seed: int = 0, batch_size: int = 4, num_segments: int = 4):
    """(model, loss_fn, batch iterator, validate) for the tiny AVE preset on synthetic batches
    whose label is a function of the frame colour, so the loss visibly falls."""
    from avmoe.batch import AVBatch
    from avmoe.tasks import get_task

    torch.manual_seed(seed)
    task = get_task("ave")
    cfg = task.config(preset="tiny", num_segments=num_segments)
    model = task.build_model(cfg)
    n_cls = 28  # the AVE head's event classes; background is index 28
    events = 4  # as the synthetic datasets: few events, so a short run visibly learns
    g = torch.Generator().manual_seed(seed)

    def make(bsz: int) -> AVBatch:
        cls = torch.randint(0, events, (bsz,), generator=g)
        frames = torch.randint(0, 40, (bsz, num_segments, 40, 48, 3), dtype=torch.uint8, generator=g)
        frames[..., 0] += (cls * 60).to(torch.uint8).view(-1, 1, 1, 1)  # class-coloured red channel
        t = torch.arange(num_segments * cfg.audio.segment_samples) / 32000.0
        tone = torch.sin(2 * torch.pi * (200 + 40 * cls.view(-1, 1)) * t) * 3000
        audio = tone.to(torch.int16)
        labels = cls.view(-1, 1).expand(bsz, num_segments).clone()
        labels[:, 0] = n_cls  # background first segment, as the official data often has
        return AVBatch(frames=frames, audio=audio, targets={"segment_labels": labels},
                       keys=[f"d{i}" for i in range(bsz)])

    def batches() -> Iterator[AVBatch]:
        while True:
            yield make(batch_size)

    val_batch = make(batch_size * 2)

    def loss_fn(m, b):
        return task.loss(m(b), b, cfg)[0]

    def validate() -> tuple[str, float]:
        model.eval()
        acc = task.metric_accumulator(cfg)
        with torch.no_grad():
            acc.update(task.predict(model(val_batch), val_batch), val_batch)
        return task.primary_metric, float(acc.compute()[task.primary_metric])

    return model, loss_fn, batches(), validate
