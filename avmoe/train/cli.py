"""What every ``jobs/<task>.py`` runs: flags + ``key=value`` overrides -> ``TrainConfig`` ->
checks (no Ray yet) -> Ray (the cluster, or an embedded local one) -> fit -> printed metrics.

Cluster or not: with ``RAY_ADDRESS`` set, or under ``ray job submit`` (``RAY_JOB_ID``), the job
connects to that cluster; otherwise it starts an embedded loopback-only Ray on this machine.

With no ``--data`` on an embedded run, the job generates (or reuses) the synthetic dataset of
its task under ``data/demo/`` and packs it (``data_pipeline.demo``), then trains the tiny
preset with the task's ``demo_schedule`` on 2 CPU workers: a complete run in a few minutes on
2 cores. Nothing here names a task: the flags, the variant option and the demo come from the
task object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from avmoe.train.config import ConfigError, TrainConfig, parse_overrides

# flag -> TrainConfig key (values are parsed by the field's type, so errors name the key)
FLAGS = {
    "--data": "data", "--storage": "storage", "--name": "name", "--preset": "preset",
    "--workers": "workers", "--gpus-per-worker": "gpus_per_worker", "--cpus-per-worker": "cpus_per_worker",
    "--zero-stage": "zero_stage", "--epochs": "epochs", "--batch-size": "batch_size",
    "--grad-accum": "grad_accum", "--lr": "lr", "--seed": "seed", "--max-steps": "max_steps",
    "--max-failures": "max_failures", "--precision": "precision", "--deepspeed-config": "deepspeed_config",
    "--eval-only": "eval_only", "--eval-drop": "eval_drop", "--modulation": "modulation",
    "--ogm-alpha": "ogm_alpha", "--checkpoint-every": "checkpoint_every",
    "--metrics-address": "metrics_address", "--metrics-port": "metrics_port",
}


def build_parser(task_name: str) -> argparse.ArgumentParser:
    from avmoe.tasks import get_task

    task = get_task(task_name)
    p = argparse.ArgumentParser(
        prog=f"jobs/{task_name}.py",
        description=f"Train (or evaluate) the {task_name.upper()} model on Ray Train + DeepSpeed.",
        epilog="Any TrainConfig field as key=value (e.g. keep_checkpoints=3), model config keys as "
               "model.<key>=value (e.g. model.adapter.num_tokens=8). No --data on an embedded run: "
               "synthetic data + tiny preset. See README 'Training jobs'.")
    for flag, key in FLAGS.items():
        p.add_argument(flag, dest=key, default=None, metavar=key.upper())
    if task.variants:
        p.add_argument(f"--{task.variant_option}", dest="variant", choices=task.variants,
                       default=task.variants[0], help=f"task variant (default {task.variants[0]})")
    p.add_argument("--no-test", action="store_true", help="skip the final test-split evaluation")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_from_args(task_name: str, argv: list[str] | None) -> tuple[TrainConfig, bool, bool]:
    """(config, synthetic, print_only) -- ``synthetic`` when the embedded default supplies the data."""
    from avmoe.ray_env import on_cluster

    args = build_parser(task_name).parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in FLAGS.values() and v is not None}
    cfg = TrainConfig.of(task=task_name, variant=getattr(args, "variant", None),
                         storage=os.path.abspath(os.environ.get("AVMOE_STORAGE", "runs")))
    synthetic = "data" not in given and "eval_only" not in given and not on_cluster()
    if synthetic:
        cfg.apply(cfg.get_task().demo_schedule)
    cfg.apply(given)
    cfg.apply(parse_overrides(args.overrides))
    if args.no_test:
        cfg.evaluation.test = False
    if args.no_plots:
        cfg.evaluation.plots = False
    if synthetic:
        cfg.paths.data = "<synthetic>"  # filled in after the checks that need no data
    return cfg, synthetic, args.print_config


def connect(tcfg: TrainConfig) -> None:
    """The cluster when there is one, else an embedded loopback-only Ray."""
    import ray

    from avmoe.ray_env import init_local_ray, on_cluster

    if ray.is_initialized():
        return
    if on_cluster():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto")
        return
    need = tcfg.scale.workers * tcfg.scale.cpus_per_worker
    # one logical CPU more than the workers hold, so the ingest's decode tasks can run beside them
    init_local_ray(num_cpus=int(max(os.cpu_count() or 1, need + 1)))


def format_results(r: dict[str, Any]) -> str:
    primary = r["primary_metric"]
    lines = [f"run {r['run_name']} ({r['task']}, {r['world_size']} workers, ZeRO {r['zero_stage']})"]
    for h in r.get("history", []):
        lines.append(f"  epoch {h['epoch']:3d}  step {h['step']:6d}  train_loss {h['train_loss']:.4f}  "
                     f"val {primary} {h['val'].get(primary, float('nan')):.4f}")
    b = r.get("best") or {}
    if b.get("epoch") is not None:
        lines.append(f"  best on validation: epoch {b['epoch']} ({primary} {b[f'val_{primary}']:.4f}, "
                     f"checkpoint {b['checkpoint']})")
    if "test" in r:
        lines.append("  test: " + ", ".join(f"{k} {v:.4f}" for k, v in r["test"].items()))
    if r.get("test_fallback"):
        lines.append(f"  note: {r['test_fallback']}")
    for k in ("test_drop_audio", "test_drop_visual"):
        if k in r:
            lines.append(f"  {k.replace('_', ' ')}: " + ", ".join(f"{m} {v:.4f}" for m, v in r[k].items()))
    if r.get("stopped_at_max_steps"):
        lines.append("  stopped at max_steps: run again with the same --name to continue")
    if r.get("results_dir"):
        lines.append(f"  results: {r['results_dir']}/results.json (+ plots/)")
    return "\n".join(lines)


def main(task_name: str, argv: list[str] | None = None) -> int:
    from avmoe.ray_env import apply_loopback_env

    # before anything imports Ray: an embedded run stays on loopback (no-op on a cluster)
    apply_loopback_env()
    from avmoe.train.driver import fit, prepare

    t0 = time.perf_counter()
    try:
        tcfg, synthetic, print_only = config_from_args(task_name, argv)
        if synthetic:
            # check everything but the data before generating it
            TrainConfig.from_dict(tcfg.to_dict()).apply({"data": "unused"}).validate()
            from data_pipeline.demo import prepare_demo_shards

            dataset = tcfg.get_task().dataset
            tcfg.paths.data = os.path.abspath(prepare_demo_shards(
                dataset, root=os.environ.get("AVMOE_DEMO_DIR", "data/demo")))
            print(f"[{task_name}] embedded default: synthetic {dataset} shards at {tcfg.paths.data}, preset "
                  f"{tcfg.preset}, {tcfg.scale.workers} CPU workers")
        tcfg = prepare(tcfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if print_only:
        d = tcfg.to_dict()
        d["optim"] = tcfg.resolved_optim().to_dict()  # the values the run will use
        print(json.dumps(d, indent=1))
        return 0
    connect(tcfg)
    try:
        results = fit(tcfg, prepared=True)
    except SystemExit:  # SIGTERM / SIGHUP (Ray's own shutdown then runs at exit)
        from avmoe.ray_env import termination_signal

        sig = termination_signal()
        if sig is None:
            raise
        print(f"[{task_name}] stopped by signal {sig}; run again with --name {tcfg.run_name()} to resume "
              f"from its latest checkpoint", file=sys.stderr)
        return 128 + sig
    print(format_results(results))
    print(f"[{task_name}] done in {time.perf_counter() - t0:.0f} s")
    return 0
