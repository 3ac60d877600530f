"""One-device training-step benchmark of the AVE task (results in bench/README.md, "GPU (`bench/gpu.py`)").

What is timed is what training runs: the project's own ``Trainer`` in this process, world size 1,
with a ``LocalSession`` (as ``avmoe.train.run_local`` does): ``Trainer.setup`` builds the task's
model for ``--preset``, the two ``ShardStream``s over real shards (the ingest, ``--decode-on``),
the telemetry's FLOP count per sample and the DeepSpeed engine (ZeRO 0; bf16 autocast on a GPU,
fp32 on the CPU: the trainer's ``precision="auto"``); ``Trainer.train_epoch`` / ``train_step`` run
the steps: the ingest's next batch, forward, loss, ``engine.backward``, ``engine.step``,
telemetry. A small subclass only adds the flags after setup (``--activation-checkpointing``:
``AVModel.set_grad_checkpointing``; ``--compile``: ``torch.compile`` of the model in place, which
DeepSpeed's engine then calls), resets the memory peak after the warm-up steps, and ends after
the training steps (no validation, checkpoint or test).

One device: CUDA when available (``--device auto``), else the CPU fallback (use ``--preset tiny``
there). Data: a synthetic AVE set (``data_pipeline.synth``) packed at the preset's frame size,
the training shards replicated under new keys (as bench/ingest.py does) so that one epoch holds
``(--warmup + --steps) x batch x grad_accum`` samples; kept under ``--data DIR`` for the next run,
else in a temporary directory.

Figures, over the ``--steps`` optimiser steps after ``--warmup`` (one step = ``grad_accum``
micro-batches; the trainer's own boundary-to-boundary step time):
  * step time: median, p10-p90;
  * samples/s = the timed steps' samples / the sum of their step times;
  * MFU = FLOPs per sample (``avmoe.telemetry.flops_per_sample`` on the real graph, forward +
    backward, measured by the trainer before the flags are applied: recomputation by activation
    checkpointing is not counted, as MFU's definition wants) x samples/s / the device's bf16 dense
    peak (``peak_flops_for(device name)``; ``AVMOE_PEAK_FLOPS`` overrides; on the CPU "n/a" unless
    it is set);
  * data wait % = time blocked in ``next(batch)`` / step time (the trainer's own ``wait_times``);
  * peak memory: ``torch.cuda.max_memory_allocated`` (and reserved) since the end of the warm-up on
    a GPU; on the CPU the process's peak RSS (``VmHWM``), reset at the end of the warm-up where
    ``/proc/self/clear_refs`` allows it.

    scripts/loopback .venv/bin/python bench/gpu.py [--preset paper] [--steps 50] [--warmup 5]
        [--activation-checkpointing] [--compile] [--variants plain,ckpt,compile,ckpt+compile]
        [--decode-on auto|ingest|trainer|gpu] [--batch-size B] [--grad-accum A] [--data DIR] [--out JSON]
    .venv/bin/python bench/gpu.py --preset paper --activation-memory 2   # no GPU needed

``--activation-memory FRAMES`` measures instead, on the CPU, what activation checkpointing keeps:
the bytes autograd saves for the backward in one training forward of the model (one video of
FRAMES segments, fp32), without and with checkpointing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("AVMOE_CACHE_DIR", os.path.join(REPO, ".cache", "avmoe"))

VARIANTS = {"plain": (False, False), "ckpt": (True, False), "compile": (False, True), "ckpt+compile": (True, True)}


# ------------------------------------------------------------------------------ data
def _replicate():
    """bench/ingest.py's ``replicate`` (shards copied under new keys, with a manifest)."""
    spec = importlib.util.spec_from_file_location("bench_ingest", os.path.join(REPO, "bench", "ingest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.replicate


def make_shards(root: str, frame_size: int, n_train: int, base: int = 32, log=print) -> str:
    """AVE shards at ``frame_size`` with at least ``n_train`` training samples (``base`` synthetic
    videos, packed, replicated) and a validation split (the trainer's FLOP probe reads one batch);
    reused when ``root`` already holds enough."""
    from data_pipeline.pack import PackOptions, pack
    from data_pipeline.synth import synth

    shards = os.path.join(root, f"ave-{frame_size}px")
    manifest = os.path.join(shards, "train.manifest.json")
    if os.path.exists(manifest) and os.path.exists(os.path.join(shards, "val.manifest.json")):
        with open(manifest) as f:
            if json.load(f)["num_samples"] >= n_train:
                log(f"data: reusing {shards}")
                return shards
    t0 = time.perf_counter()
    n_base = max(2, min(base, n_train))
    raw, one = os.path.join(root, f"raw-{frame_size}px-{n_base}"), os.path.join(root, f"base-{frame_size}px-{n_base}")
    if not os.path.exists(os.path.join(raw, ".complete")):
        synth("ave", n_base, raw, seed=0, size=max(frame_size, 96))
        open(os.path.join(raw, ".complete"), "w").close()
    opts = PackOptions(frame_size=frame_size, shard_samples=16)
    workers = max(1, min(4, os.cpu_count() or 1))
    pack("ave", raw, "train", one, opts, workers=workers, progress=False)
    shutil.rmtree(shards, ignore_errors=True)
    _replicate()(one, shards, math.ceil(n_train / n_base))
    pack("ave", raw, "val", shards, opts, workers=workers, progress=False)
    with open(manifest) as f:
        n = json.load(f)["num_samples"]
    log(f"data: {n} training samples ({n_base} synthetic videos x {math.ceil(n_train / n_base)}) at "
        f"{frame_size}x{frame_size} in {shards} ({time.perf_counter() - t0:.1f} s)")
    return shards


# ------------------------------------------------------------------------------ memory
def _vm_hwm() -> int | None:
    """Peak resident set of this process (bytes), ``VmHWM``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device) -> str:
    """Start the peak-memory window here; returns what the peak then covers."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "since the warm-up"
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "since the warm-up"
    except OSError:
        return "whole process"


def peak_memory(device) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_bytes": _vm_hwm(), "peak_memory_reserved_bytes": None,
            "peak_memory_kind": "process peak RSS (VmHWM)"}


# ------------------------------------------------------------------------------ the trainer
def bench_trainer_class():
    from avmoe.train.trainer import Trainer

    class BenchTrainer(Trainer):
        """The trainer as it is, plus the flags; ends after the training steps."""

        options: dict = {}

        def _measure_flops(self, model):
            self.flops = super()._measure_flops(model)  # before the flags: model FLOPs, no recompute
            return self.flops

        def setup(self) -> None:
            t0 = time.perf_counter()
            self.flops = None
            super().setup()
            opts = type(self).options
            if opts["activation_checkpointing"]:
                self.module.set_grad_checkpointing(True)
            if opts["compile"]:
                self.module.compile()  # in place: DeepSpeed's engine calls the compiled forward
            self.setup_s = time.perf_counter() - t0
            self.memory_window = reset_peak_memory(self.device) if opts["warmup"] == 0 else None

        def after_step(self) -> None:
            if self.state.step == type(self).options["warmup"]:
                self.memory_window = reset_peak_memory(self.device)

        def run(self) -> None:
            self.setup()
            try:
                self.train_epoch()
            finally:
                self.metrics.close()
                if self.tracker is not None:
                    self.tracker.close()

    return BenchTrainer


def percentile(vals: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(vals, q))


def run_variant(name: str, args, shards: str, work: str, device, peak: float | None) -> dict:
    import torch

    from avmoe.train import TrainConfig, prepare
    from avmoe.train.session import LocalSession

    ckpt, comp = VARIANTS[name]
    on_gpu = device.type == "cuda"
    total_steps = args.warmup + args.steps
    run_name = f"gpu-bench-{name.replace('+', '-')}-{int(time.time())}"
    tcfg = prepare(TrainConfig.of(
        task="ave", preset=args.preset, data=shards, storage=os.path.join(work, "runs"), name=run_name,
        workers=1, gpus_per_worker=1.0 if on_gpu else 0.0, cpus_per_worker=float(args.cpus_per_worker),
        epochs=1, batch_size=args.batch_size, grad_accum=args.grad_accum,
        limit_train_batches=total_steps * args.grad_accum, limit_eval_batches=1, test=False, plots=False,
        decode_on=args.decode_on, metrics_address="127.0.0.1", metrics_port=0, metrics_sd_dir=""))
    cls = bench_trainer_class()
    cls.options = {"activation_checkpointing": ckpt, "compile": comp, "warmup": args.warmup}
    # (a variant after another: what the previous one left allocated, part of this one's peak)
    allocated_before = int(torch.cuda.memory_allocated(device)) if on_gpu else None
    session = LocalSession(tcfg.paths.storage, run_name)
    trainer = cls({"train": tcfg.to_dict(), "run_name": run_name, "eval_only": None}, session)
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    mem = peak_memory(trainer.device)
    steps, waits = trainer.step_times[args.warmup:], trainer.wait_times[args.warmup:]
    per_step = trainer.batch_size * trainer.grad_accum
    rate = len(steps) * per_step / sum(steps)
    flops = trainer.flops
    row = {
        "variant": name, "activation_checkpointing": ckpt, "compile": comp,
        "steps_timed": len(steps), "samples_per_step": per_step,
        "step_time_s": {"median": statistics.median(steps), "p10": percentile(steps, 10),
                        "p90": percentile(steps, 90), "mean": statistics.fmean(steps)},
        "samples_per_s": rate,
        "flops_per_sample": flops,
        "mfu": flops * rate / peak if flops and peak else None,
        "data_wait_pct": 100.0 * sum(waits) / sum(steps),
        **mem, "peak_memory_window": trainer.memory_window, "allocated_before_bytes": allocated_before,
        "first_step_s": trainer.step_times[0], "setup_s": trainer.setup_s, "wall_s": wall,
        "decode_on": trainer.train_stream.decode_on,
        "trainable_params": sum(p.numel() for p in trainer.module.trainable_parameters()),
        "step_times_s": trainer.step_times, "wait_times_s": trainer.wait_times,
    }
    del trainer
    gc.collect()
    if comp:
        torch._dynamo.reset()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------ activation memory
def saved_activations(preset: str, frames: int) -> list[dict]:
    """What activation checkpointing keeps, without a GPU: the bytes autograd saves for the backward
    in one training forward of the real model (fp32, on the CPU; one video of ``frames`` segments),
    counted with saved-tensor hooks, each storage once, the parameters left out. Eager checkpointing,
    and the path taken under torch.compile (only the frozen sub-layers of adapted pairs recomputed;
    taken here in eager mode through the trunk's ``_compiling`` hook)."""
    import torch

    import avmoe.models.trunk as trunk_module
    from avmoe.tasks import get_task

    task = get_task("ave")
    cfg = task.config(preset=preset, num_segments=frames)
    torch.manual_seed(0)
    model = task.build_model(cfg)
    model.train()
    size = int(cfg.visual.img_size)
    batch = task.example_batch(cfg, batch_size=1, seed=0, frame_hw=(size, size))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []
    compiling = trunk_module._compiling
    try:
        for name, ckpt, compiled_path in (("plain", False, False), ("ckpt", True, False),
                                          ("ckpt, torch.compile's path", True, True)):
            trunk_module._compiling = lambda c=compiled_path: c
            model.set_grad_checkpointing(ckpt)
            seen: set[int] = set()
            total = 0

            def pack(x):
                nonlocal total
                ptr = x.untyped_storage().data_ptr()
                if ptr not in seen and ptr not in params:
                    seen.add(ptr)
                    total += x.untyped_storage().nbytes()
                return x

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                loss, _ = task.loss(model(batch), batch, cfg)
            loss.backward()
            model.zero_grad(set_to_none=True)
            rows.append({"variant": name, "saved_bytes": total, "frames": frames,
                         "saved_mib_per_frame": total / 2**20 / frames})
    finally:
        trunk_module._compiling = compiling
    return rows


# ------------------------------------------------------------------------------ report
def fmt(x, spec=".1f", none="n/a") -> str:
    return none if x is None else format(x, spec)


def table(result: dict) -> str:
    lines = ["| variant | step time (ms), median (p10-p90) | samples/s | MFU | data wait % | peak memory (MiB) "
             "| first step (s) |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("error"):
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        st = r["step_time_s"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        mem = r["peak_memory_bytes"]
        lines.append(f"| {r['variant']} | {st['median'] * 1e3:.1f} ({st['p10'] * 1e3:.1f}-{st['p90'] * 1e3:.1f}) "
                     f"| {r['samples_per_s']:.2f} | {mfu} | {r['data_wait_pct']:.1f} "
                     f"| {fmt(None if mem is None else mem / 2**20, '.0f')} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=("paper", "tiny", "official"))
    p.add_argument("--steps", type=int, default=50, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimiser steps first (compile, ingest start)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: the task's, AVE 2)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: the task's, AVE 8)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the backbone blocks in the backward (AVModel.set_grad_checkpointing)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (in place)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {', '.join(VARIANTS)}: several runs in one invocation (overrides the "
                        "two flags above; shares the data and Ray)")
    p.add_argument("--decode-on", default="auto", choices=("auto", "ingest", "trainer", "gpu"),
                   help="where JPEG frames are decoded (IngestConfig.decode_on; auto: the ingest's choice)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="the trainer's CPUs: torch threads and trainer-side decode threads (default 1 on the "
                        "CPU, half the cores with a GPU)")
    p.add_argument("--data", default=None, help="keep / reuse the shards here (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--activation-memory", type=int, default=None, metavar="FRAMES",
                   help="instead: the activations autograd keeps for one video of FRAMES segments, with and "
                        "without checkpointing (fp32, CPU, no ingest)")
    args = p.parse_args(argv)
    if args.activation_memory:
        rows = saved_activations(args.preset, args.activation_memory)
        print(f"| {args.preset} preset, {args.activation_memory} frames, fp32 | saved for backward (MiB) "
              "| per frame (MiB) | vs plain |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['saved_bytes'] / 2**20:.1f} | {r['saved_mib_per_frame']:.1f} "
                  f"| {r['saved_bytes'] / rows[0]['saved_bytes']:.2f}x |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"preset": args.preset, "activation_memory": rows}, f, indent=1)
        return 0
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    names = [v.strip() for v in args.variants.split(",")] if args.variants else \
        [{v: k for k, v in VARIANTS.items()}[(args.activation_checkpointing, args.compile)]]
    for v in names:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")

    load_before = os.getloadavg()
    from avmoe.ray_env import apply_loopback_env

    apply_loopback_env()  # before Ray is imported
    import torch

    from avmoe.tasks import get_task
    from avmoe.telemetry.flops import current_device_peak, peak_flops_for

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device("cuda", 0) if args.device != "cpu" and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed and the trainer stay on the CPU
        if args.decode_on == "gpu":
            p.error("--decode-on gpu needs a CUDA device")
    if any(VARIANTS[v][1] for v in names) and device.type == "cpu":
        print("note: --compile on the CPU compiles with Inductor's C++ backend: minutes for the first step "
              "on a small machine (the warm-up steps absorb it)", flush=True)
    task = get_task("ave")
    cfg = task.config(preset=args.preset)
    optim = task.training_defaults(args.preset)
    args.batch_size = args.batch_size or int(optim.batch_size)
    args.grad_accum = args.grad_accum or int(optim.grad_accum)
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 1.0 if device.type == "cpu" else float(max(1, (os.cpu_count() or 2) // 2))
    frame = int(cfg.visual.img_size)
    n_train = (args.warmup + args.steps) * args.batch_size * args.grad_accum

    work = tempfile.mkdtemp(prefix="avmoe-bench-gpu-")
    try:
        shards = make_shards(args.data or os.path.join(work, "data"), frame, n_train)
        from avmoe.ray_env import init_local_ray
        from avmoe.train.process_group import init_local_group

        init_local_ray(num_cpus=os.cpu_count(), object_store_memory=1 << 30)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # world size 1: nothing leaves the process
            init_local_group("nccl")  # as Ray Train's GPU workers (gloo would all-reduce CUDA grads via the host)
            name, peak = current_device_peak()
        else:
            init_local_group("gloo")
            name, peak = cpu_name(), peak_flops_for(None)  # None unless AVMOE_PEAK_FLOPS is set
        precision = "bf16 (autocast)" if device.type == "cuda" else "fp32"
        print(f"device: {name} ({device.type}); peak {fmt(None if peak is None else peak / 1e12, '.0f')} TFLOP/s; "
              f"{args.preset} preset, {precision}, batch {args.batch_size} x {args.grad_accum} micro-batches per "
              f"step, {args.warmup} warm-up + {args.steps} timed steps; variants: {', '.join(names)}", flush=True)
        runs = []
        failed = False
        for v in names:
            try:
                r = run_variant(v, args, shards, work, device, peak)
            except Exception as e:  # a variant that cannot run (e.g. torch.compile here) is reported, not hidden
                if not VARIANTS[v][1]:
                    raise
                failed = True
                msg = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"{v}: {msg}", flush=True)
                r = {"variant": v, "error": msg}
            else:
                st = r["step_time_s"]
                print(f"{v}: step {st['median'] * 1e3:.1f} ms (p10 {st['p10'] * 1e3:.1f}, p90 {st['p90'] * 1e3:.1f}), "
                      f"{r['samples_per_s']:.2f} samples/s, data wait {r['data_wait_pct']:.1f} %, first step "
                      f"{r['first_step_s']:.1f} s", flush=True)
            runs.append(r)
        result = {
            "device": name, "device_type": device.type, "peak_flops": peak, "precision": precision,
            "preset": args.preset, "task": "ave", "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "samples_per_step": args.batch_size * args.grad_accum, "steps": args.steps, "warmup": args.warmup,
            "frame_size": frame, "cpus_per_worker": args.cpus_per_worker, "decode_on_flag": args.decode_on,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": load_before,
            "load_after": os.getloadavg(), "runs": runs,
        }
        print()
        print(table(result))
        flops = next((r["flops_per_sample"] for r in runs if "error" not in r), None)
        print(f"\nMFU = FLOPs per sample ({fmt(flops, '.3e')}, "
              f"the telemetry's count, forward + backward) x samples/s / peak "
              f"({'n/a: peak unknown for this device (set AVMOE_PEAK_FLOPS)' if peak is None else f'{peak:.3e}'}); "
              f"peak memory: {runs[0].get('peak_memory_kind', '')}; load average before "
              f"{' '.join(f'{x:.1f}' for x in load_before)}, after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


if __name__ == "__main__":
    raise SystemExit(main())
