"""Trainer overhead benchmark (results in bench/README.md, "Trainer").

1. Step time of our trainer (Ray Train TorchTrainer + DeepSpeed ZeRO 0, 1 CPU worker) vs a bare
   PyTorch loop (torch Adam, no Ray, no DeepSpeed) over the same model (AVE tiny preset) and the
   same batches (the trainer's epoch-0 batches, read with the same ShardStream plan and held in
   memory for the bare loop). Both use one intra-op thread. The trainer's step time is what its
   loop measures, boundary to boundary: waiting for the next batch from the ingest, forward, loss,
   backward, DeepSpeed step, telemetry. The bare loop and the trainer alternate, the order swapped
   every repeat (bare, trainer / trainer, bare / ...), so slow phases of a shared machine hit both.
2. ZeRO 0/1/2/3 step times with 2 CPU workers, the stages interleaved (order rotated) within each
   of ``--stage-repeats`` repeats.
3. Time to first step of each run: fit() called -> first optimiser step done, split into the
   worker start (fit() -> the Trainer object constructed in the Ray Train worker: controller,
   worker group, process imports) and ours (Trainer constructed -> first step done: model build,
   ShardStream, DeepSpeed init, the ingest's first batch, the first step), with DeepSpeed's
   JIT-built CPU comm op already in the cache (a warm-up run builds it first if it is missing),
   so its one-off ~40 s build is not counted.
4. ``--breakdown`` (default on): one more 2-worker run per ZeRO stage with DeepSpeed's
   ``wall_clock_breakdown``, rank 0's per-micro-step forward / backward (of which the gradient
   reduction) / optimizer step read from its Ray worker log -- what orders the ZeRO stages.

    scripts/loopback .venv/bin/python bench/trainer.py [--steps 40] [--repeats 5] [--stage-repeats 3]

Step time of a run: the median over its steps (the trainer's own ``median_step_s``, first step
included; the bare loop the same way). Figures: median over repeats, with min-max; the
trainer/bare ratio also per repeat (each repeat's pair ran back to back).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("AVMOE_CACHE_DIR", os.path.join(REPO, ".cache", "avmoe"))


def bare_loop(data: str, steps: int, batch_size: int, seed: int) -> list[float]:
    import torch

    from avmoe.tasks import get_task
    from avmoe.train import TrainConfig, prepare
    from data_pipeline.ingest import IngestConfig, ShardStream

    torch.set_num_threads(1)
    tcfg = prepare(TrainConfig.of(task="ave", data=data, storage="unused", workers=1, batch_size=batch_size,
                               grad_accum=1, seed=seed))
    cfg = tcfg.task_config()
    task = get_task("ave")
    torch.manual_seed(seed)
    model = task.build_model(cfg)
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=5e-4)
    stream = ShardStream(IngestConfig(url=data, split="train", batch_size=batch_size, seed=seed, shuffle=True,
                                      shuffle_buffer=256), rank=0, world_size=1)
    batches = [b for _, b in zip(range(steps), stream.epoch(0))]
    times = []
    for b in batches:
        t0 = time.perf_counter()
        loss, _ = task.loss(model(b), b, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def trainer_run(data: str, storage: str, name: str, workers: int, zero: int, steps: int, batch_size: int,
                seed: int, deepspeed_config: str | None = None) -> dict:
    from avmoe.train import TrainConfig, fit, prepare

    extra = {"deepspeed_config": deepspeed_config} if deepspeed_config else {}
    tcfg = prepare(TrainConfig.of(task="ave", data=data, storage=storage, name=name, workers=workers,
                               cpus_per_worker=1.0 if workers == 1 else 0.5, decode_cpus=0.5,
                               zero_stage=zero, epochs=1, batch_size=batch_size, grad_accum=1, seed=seed,
                               limit_train_batches=steps, limit_eval_batches=1, test=False, plots=False,
                               metrics_address="127.0.0.1", metrics_port=0, scheduler="none", **extra))
    t0 = time.time()
    r = fit(tcfg, prepared=True)
    t = r["timing"]
    return {"median_step_s": t["median_step_s"], "time_to_first_step_s": t["first_step_unix"] - t0,
            "worker_start_s": t["worker_start_unix"] - t0, "ours_s": t["first_step_unix"] - t["worker_start_unix"],
            "deepspeed_init_s": t["deepspeed_init_s"], "steps": t["steps_timed"]}


BREAKDOWN = ("fwd_microstep", "bwd_microstep", "bwd_inner_microstep", "bwd_allreduce_microstep", "step_microstep",
             "optimizer_gradients", "optimizer_step", "optimizer_allgather")


def breakdown_from_logs(session_dir: str, since: float) -> dict[str, float]:
    """Medians (ms) of DeepSpeed's timers printed by rank 0 into its Ray worker log after every step
    (``[Rank 0] time (ms) | fwd_microstep: ... | ...``; ZeRO 1/2 also ``optimizer_gradients``
    (its own partition's gradients gathered / norm), ``optimizer_step`` (Adam on the partition),
    ``optimizer_allgather`` (the updated partitions all-gathered into every rank's weights)),
    from logs written after ``since``, the first step left out."""
    vals: dict[str, list[float]] = {k: [] for k in BREAKDOWN}
    for path in glob.glob(os.path.join(session_dir, "logs", "**", "*.out"), recursive=True) + \
            glob.glob(os.path.join(session_dir, "logs", "**", "*.log"), recursive=True):
        try:
            if os.path.getmtime(path) < since:
                continue
            with open(path, errors="replace") as f:
                for line in f:
                    if "time (ms)" not in line or "Rank 0" not in line:
                        continue
                    for k, v in re.findall(r"(\w+): ([0-9.]+)", line):
                        if k in vals:
                            vals[k].append(float(v))
        except OSError:
            pass
    return {k: statistics.median(v[1:] or v) for k, v in vals.items() if v}


def spread(vals, scale=1.0, spec=".1f") -> str:
    vals = [v * scale for v in vals]
    med = statistics.median(vals)
    return format(med, spec) if len(vals) == 1 else \
        f"{format(med, spec)} ({format(min(vals), spec)}-{format(max(vals), spec)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="batches of a 1-worker run (2-worker runs: half each)")
    p.add_argument("--repeats", type=int, default=5, help="1-worker trainer / bare loop pairs")
    p.add_argument("--stage-repeats", type=int, default=3, help="repeats of the 2-worker ZeRO runs")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = p.parse_args()

    from avmoe.ray_env import init_local_ray
    from data_pipeline.demo import prepare_demo_shards

    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="avmoe-bench-trainer-")
    # enough training samples for --steps batches of --batch-size
    n = max(48, args.steps * args.batch_size + 16)
    data = prepare_demo_shards("ave", root=os.path.join(work, "data"), n=n, frame_size=64, log=lambda *_: None)
    ray = init_local_ray(num_cpus=3)  # 2 worker CPUs + 1 for the ingest's decode tasks (imports ray after
    # the loopback environment is set: Ray reads RAY_AUTH_MODE at import)
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    seed = 999
    ext = os.path.join(os.environ["AVMOE_CACHE_DIR"], "torch_extensions", "deepspeed_shm_comm",
                       "deepspeed_shm_comm.so")
    if not os.path.exists(ext):
        print("warm-up: building DeepSpeed's CPU comm op (not timed)", flush=True)
        trainer_run(data, work, "warmup", 1, 0, 2, args.batch_size, seed)

    bare: list[float] = []
    one: list[dict] = []
    for rep in range(args.repeats):
        order = ("bare", "trainer") if rep % 2 == 0 else ("trainer", "bare")
        for what in order:
            if what == "bare":
                bare.append(statistics.median(bare_loop(data, args.steps, args.batch_size, seed)))
            else:
                one.append(trainer_run(data, work, f"w1-z0-{rep}", 1, 0, args.steps, args.batch_size, seed))
        print(f"repeat {rep} ({' then '.join(order)}): bare {bare[-1] * 1e3:.1f} ms, trainer "
              f"{one[-1]['median_step_s'] * 1e3:.1f} ms = {one[-1]['median_step_s'] / bare[-1]:.2f}x; first step "
              f"{one[-1]['time_to_first_step_s']:.1f} s (worker start {one[-1]['worker_start_s']:.1f} s); "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    stages = [int(z) for z in args.stages.split(",")]
    rows: dict[str, list[dict]] = {"1 worker, ZeRO 0": one}
    for rep in range(args.stage_repeats):
        for zero in stages[rep % len(stages):] + stages[:rep % len(stages)]:
            r = trainer_run(data, work, f"w2-z{zero}-{rep}", 2, zero, args.steps // 2, args.batch_size, seed)
            rows.setdefault(f"2 workers, ZeRO {zero}", []).append(r)
            print(f"2 workers ZeRO {zero} repeat {rep}: {r['median_step_s'] * 1e3:.1f} ms; load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = {"1 worker, ZeRO 0": one, **{f"2 workers, ZeRO {z}": rows[f"2 workers, ZeRO {z}"] for z in stages}}
    breakdown: dict[int, dict] = {}
    if args.breakdown:
        for zero in stages:
            since = time.time()
            trainer_run(data, work, f"w2-z{zero}-breakdown", 2, zero, args.steps // 2, args.batch_size, seed,
                        deepspeed_config=json.dumps({"wall_clock_breakdown": True}))
            time.sleep(2)  # the worker's stdout reaches its log file
            breakdown[zero] = breakdown_from_logs(session_dir, since)
            print(f"breakdown ZeRO {zero}: {breakdown[zero]}", flush=True)
    load_after = os.getloadavg()

    med = statistics.median
    bare_ms = med(bare) * 1e3
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"load average (1/5/15 min) before {' '.join(f'{x:.1f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.1f}' for x in load_after)}")
    print(f"batch {args.batch_size} per worker, {args.steps} batches per 1-worker run ({args.steps // 2} per "
          f"worker with 2); repeats: {args.repeats} (1 worker, bare loop), {args.stage_repeats} (2 workers); "
          f"median (min-max) over repeats\n")
    print("| run | step time (ms) | vs bare loop | time to first step (s) | of which worker start (s) "
          "| of which ours (s) | ours: DeepSpeed init (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bare PyTorch loop (1 process) | {spread(bare, 1e3)} | 1.00x | - | - | - | - |")
    for name, rs in rows.items():
        step = [r["median_step_s"] for r in rs]
        print(f"| {name} | {spread(step, 1e3)} | {med(step) * 1e3 / bare_ms:.2f}x "
              f"| {spread([r['time_to_first_step_s'] for r in rs])} | {spread([r['worker_start_s'] for r in rs])} "
              f"| {spread([r['ours_s'] for r in rs])} | {spread([r['deepspeed_init_s'] for r in rs])} |")
    ratios = [r["median_step_s"] / b for r, b in zip(one, bare)]
    print(f"\nPer repeat, 1 worker ZeRO 0 / bare loop: {' '.join(f'{x:.2f}x' for x in ratios)} "
          f"(median {med(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    if breakdown:
        print("\nRank 0 of 2 workers, DeepSpeed wall_clock_breakdown, ms per micro-step (median over the run's "
              "steps; one run per stage):\n")
        print("| ZeRO | forward | backward | of which compute | of which gradient reduction | optimizer step "
              "| of which gradients | of which Adam | of which all-gather | sum |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for zero, b in breakdown.items():
            cells = [b.get(k) for k in BREAKDOWN]
            total = sum(c for c in (cells[0], cells[1], cells[4]) if c is not None)
            print(f"| {zero} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + f" | {total:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bare_step_s": bare, "runs": rows, "breakdown": breakdown,
                       "load_before": load_before, "load_after": load_after}, f, indent=1)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
