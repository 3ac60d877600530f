"""Trainer overhead benchmark (results in bench/README.md, "Trainer").

1. Step time of our trainer (Ray Train TorchTrainer + DeepSpeed ZeRO 0, 1 CPU worker) vs a bare
   PyTorch loop (torch Adam, no Ray, no DeepSpeed) over the same model (AVE tiny preset) and the
   same batches (the trainer's epoch-0 batches, read with the same ShardStream plan and held in
   memory for the bare loop). Both use one intra-op thread. The trainer's step time is what its
   loop measures, boundary to boundary: waiting for the next batch from the ingest, forward, loss,
   backward, DeepSpeed step, telemetry.
2. ZeRO 0/1/2/3 step times with 2 CPU workers.
3. Time to first step of each run: fit() called -> first optimiser step done (worker group start,
   process group, model build, DeepSpeed init, first batch), with DeepSpeed's JIT-built CPU comm
   op already in the cache (a warm-up run builds it first if it is missing), so its one-off
   ~40 s build is not counted.

    scripts/loopback .venv/bin/python bench/trainer.py [--steps 16] [--repeats 3]

Medians: over the steps of a run (first step excluded), then over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
                seed: int) -> dict:
    from avmoe.train import TrainConfig, fit, prepare

    tcfg = prepare(TrainConfig.of(task="ave", data=data, storage=storage, name=name, workers=workers,
                               cpus_per_worker=1.0 if workers == 1 else 0.5, decode_cpus=0.5,
                               zero_stage=zero, epochs=1, batch_size=batch_size, grad_accum=1, seed=seed,
                               limit_train_batches=steps, limit_eval_batches=1, test=False, plots=False,
                               metrics_address="127.0.0.1", metrics_port=0, scheduler="none"))
    t0 = time.time()
    r = fit(tcfg, prepared=True)
    t = r["timing"]
    return {"median_step_s": t["median_step_s"], "time_to_first_step_s": t["first_step_unix"] - t0,
            "worker_start_s": t["worker_start_unix"] - t0, "deepspeed_init_s": t["deepspeed_init_s"],
            "steps": t["steps_timed"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = p.parse_args()

    from avmoe.ray_env import init_local_ray

    from data_pipeline.demo import prepare_demo_shards

    work = tempfile.mkdtemp(prefix="avmoe-bench-trainer-")
    data = prepare_demo_shards("ave", root=os.path.join(work, "data"), n=48, frame_size=64, log=lambda *_: None)
    init_local_ray(num_cpus=3)  # 2 worker CPUs + 1 for the ingest's decode tasks
    seed = 999
    ext = os.path.join(os.environ["AVMOE_CACHE_DIR"], "torch_extensions", "deepspeed_shm_comm",
                       "deepspeed_shm_comm.so")
    if not os.path.exists(ext):
        print("warm-up: building DeepSpeed's CPU comm op (not timed)", flush=True)
        trainer_run(data, work, "warmup", 1, 0, 2, args.batch_size, seed)

    rows: dict[str, list[dict]] = {}
    bare: list[float] = []
    for rep in range(args.repeats):
        bare.append(statistics.median(bare_loop(data, args.steps, args.batch_size, seed)[1:]))
        rows.setdefault("1 worker, ZeRO 0", []).append(
            trainer_run(data, work, f"w1-z0-{rep}", 1, 0, args.steps, args.batch_size, seed))
        print(f"repeat {rep}: bare {bare[-1] * 1e3:.1f} ms, trainer "
              f"{rows['1 worker, ZeRO 0'][-1]['median_step_s'] * 1e3:.1f} ms", flush=True)
    for zero in [int(z) for z in args.stages.split(",")]:
        for rep in range(args.repeats):
            rows.setdefault(f"2 workers, ZeRO {zero}", []).append(
                trainer_run(data, work, f"w2-z{zero}-{rep}", 2, zero, args.steps // 2, args.batch_size, seed))
            print(f"2 workers ZeRO {zero} repeat {rep}: {rows[f'2 workers, ZeRO {zero}'][-1]}", flush=True)

    med = statistics.median
    bare_ms = med(bare) * 1e3
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"batch {args.batch_size} per worker, {args.steps} batches per 1-worker run, repeats {args.repeats}\n")
    print("| run | step time (ms) | vs bare loop | time to first step (s) | of which worker start (s) "
          "| DeepSpeed init (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| bare PyTorch loop (1 process) | {bare_ms:.1f} | 1.00x | - | - | - |")
    for name, rs in rows.items():
        step = med(r["median_step_s"] for r in rs) * 1e3
        print(f"| {name} | {step:.1f} | {step / bare_ms:.2f}x | {med(r['time_to_first_step_s'] for r in rs):.1f} "
              f"| {med(r['worker_start_s'] for r in rs):.1f} | {med(r['deepspeed_init_s'] for r in rs):.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bare_step_s": bare, "runs": rows}, f, indent=1)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
