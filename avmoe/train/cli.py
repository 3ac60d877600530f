"""What every ``jobs/<task>.py`` runs: flags + ``key=value`` overrides -> ``TrainConfig`` ->
checks (no Ray yet) -> Ray (the cluster, or an embedded local one) -> fit -> printed metrics.

Cluster or not: with ``RAY_ADDRESS`` set, or under ``ray job submit`` (``RAY_JOB_ID``), the job
connects to that cluster; otherwise it starts an embedded loopback-only Ray on this machine.

With no ``--data`` the job runs its **embedded demo**, on the embedded Ray and on any cluster
alike: it generates (or reuses) the synthetic dataset of its task and packs it where the workers
can read it (the object store of an ``s3://``/``gs://`` ``--storage``, else a per-user cache on
this node, ``AVMOE_DEMO_DIR`` overrides), then trains the tiny preset with the task's
``demo_schedule``. Nothing here names a task: the flags, the variant option and the demo come
from the task object.

The console shows the job's own lines -- one line saying what runs where, a progress bar per
epoch (``avmoe.train.progress``), the evaluations, a results table and the resume command --
and the libraries' chatter only with ``--verbose`` (``avmoe.console``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any

from avmoe.train.config import ConfigError, TrainConfig, describe_key, parse_overrides
from avmoe.train.driver import absolute_path

# flag -> TrainConfig key (values are parsed by the field's type, so errors name the key)
FLAGS = {
    "--data": "data", "--eval-data": "eval_data", "--storage": "storage", "--name": "name", "--preset": "preset",
    "--workers": "workers", "--gpus-per-worker": "gpus_per_worker", "--cpus-per-worker": "cpus_per_worker",
    "--zero-stage": "zero_stage", "--epochs": "epochs", "--batch-size": "batch_size",
    "--grad-accum": "grad_accum", "--lr": "lr", "--seed": "seed", "--max-steps": "max_steps",
    "--max-failures": "max_failures", "--precision": "precision", "--deepspeed-config": "deepspeed_config",
    "--eval-only": "eval_only", "--eval-drop": "eval_drop", "--modulation": "modulation",
    "--ogm-alpha": "ogm_alpha", "--checkpoint-every": "checkpoint_every",
    "--metrics-address": "metrics_address", "--metrics-port": "metrics_port",
    "--decode-resources": "decode_resources", "--decode-on": "decode_on", "--tracking": "tracking",
    "--worker-resources": "worker_resources", "--min-workers": "min_workers",
}
LOCAL_PATH_KEYS = ("data", "eval_data", "storage", "eval_only")  # resolved on the driver (workers run elsewhere)


def build_parser(task_name: str) -> argparse.ArgumentParser:
    from avmoe.tasks import get_task

    task = get_task(task_name)
    p = argparse.ArgumentParser(
        prog=f"jobs/{task_name}.py",
        description=f"Train (or evaluate) the {task_name.upper()} model on Ray Train + DeepSpeed. With no "
                    "--data: the embedded demo (synthetic data, tiny preset), on any cluster.",
        epilog="Any TrainConfig field as key=value (its name where unique, e.g. keep_checkpoints=3, or its "
               "path, e.g. checkpoint.keep_checkpoints=3), model config keys as model.<key>=value (e.g. "
               "model.adapter.num_tokens=8); --print-config lists every field with its resolved value. "
               "See README 'Training jobs'.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, key in FLAGS.items():
        p.add_argument(flag, dest=key, default=None, metavar=key.upper(), help=describe_key(key, task))
    if task.variants:
        p.add_argument(f"--{task.variant_option}", dest="variant", choices=task.variants,
                       default=task.variants[0], help=f"task variant (default {task.variants[0]})")
    model_defaults = task.config("tiny") if task.extra_flags else None
    for flag, (key, text, _) in task.extra_flags.items():
        from avmoe.config import describe, field_type, resolve_key

        tp = field_type(model_defaults, resolve_key(model_defaults, key))
        p.add_argument(flag, dest=f"model.{key}", default=None, metavar=key.upper(),
                       help=f"{text}; {describe(tp).replace(' or none', '')}; default: "
                            f"{getattr(model_defaults, key)!r} (= model.{key}=...)")
    p.add_argument("--no-test", action="store_true", help="skip the final test-split evaluation (default: test)")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs (default: plots/ in the run directory)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's, DeepSpeed's and torch's own log lines (default: off)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def default_storage() -> str:
    """``AVMOE_STORAGE``, else a durable per-user directory: ``$XDG_DATA_HOME/avmoe/runs``
    (``~/.local/share/avmoe/runs``) of the real user (not the loopback environment's HOME)."""
    if os.environ.get("AVMOE_STORAGE"):
        return os.environ["AVMOE_STORAGE"]
    import pwd

    home = pwd.getpwuid(os.getuid()).pw_dir
    return os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share"), "avmoe", "runs")


def config_from_args(task_name: str, argv: list[str] | None) -> tuple[TrainConfig, bool, argparse.Namespace]:
    """(config, demo, args) -- ``demo`` when the embedded demo supplies the data."""
    args = build_parser(task_name).parse_args(argv)
    given = user_settings(task_name, args)
    cfg = TrainConfig.of(task=task_name, variant=getattr(args, "variant", None), storage=default_storage())
    demo = "data" not in given and "eval_only" not in given
    if demo:
        cfg.apply(cfg.get_task().demo_schedule)
    cfg.apply(given)
    if args.no_test:
        cfg.evaluation.test = False
    if args.no_plots:
        cfg.evaluation.plots = False
    if demo:
        cfg.paths.data = "<demo>"  # filled in after the checks that need no data
    return cfg, demo, args


def user_settings(task_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags and ``key=value`` overrides the user gave, as TrainConfig override keys (local
    paths made absolute: the workers run elsewhere)."""
    from avmoe.tasks import get_task

    task = get_task(task_name)
    path_keys = {f"model.{key}" for key, _, is_path in task.extra_flags.values() if is_path}
    given = {k: v for k, v in vars(args).items()
             if (k in FLAGS.values() or k.startswith("model.")) and v is not None}
    given.update(parse_overrides(args.overrides))
    for key, value in given.items():  # local weight files of the model config too (model.visual.weights=...)
        if key in LOCAL_PATH_KEYS or key in path_keys or (key.startswith("model.") and key.endswith(".weights")):
            if str(value).lower() not in ("", "none", "null"):
                given[key] = absolute_path(value)
    return given


def connect(tcfg: TrainConfig) -> None:
    """The cluster when there is one, else an embedded loopback-only Ray; the job's runtime_env
    (quiet worker processes) either way."""
    import ray

    from avmoe.console import quiet_process

    if ray.is_initialized():
        return
    try:
        _init_ray(tcfg)
    finally:
        quiet_process()  # again, Ray imported now: the filter of the worker logs it echoes here


def _init_ray(tcfg: TrainConfig) -> None:
    import logging

    import ray

    from avmoe.console import job_runtime_env, verbose
    from avmoe.ray_env import init_local_ray, on_cluster

    quiet = {} if verbose() else {"logging_level": logging.WARNING}
    if on_cluster():
        runtime_env = job_runtime_env()
        if os.environ.get("RAY_ADDRESS"):  # (see below: the watchdog's state API address)
            runtime_env["env_vars"]["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", runtime_env=runtime_env, **quiet)
        return
    need = tcfg.scale.workers * tcfg.scale.cpus_per_worker
    # The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group watchdog
    # polls; the job's processes are told its address, which they cannot guess when several Ray
    # instances run on one machine.
    runtime_env = job_runtime_env()
    dashboard_port = _free_port()
    runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # one logical CPU more than the workers hold, so the ingest's decode tasks can run beside them
    init_local_ray(num_cpus=int(max(os.cpu_count() or 1, need + 1)), runtime_env=runtime_env,
                   include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port, **quiet)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_cluster(tcfg: TrainConfig) -> None:
    """Checks that need the cluster's shape (taken no resource yet): local storage on a
    multi-node cluster would scatter checkpoints over the nodes' disks."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in tcfg.paths.storage:
        raise ConfigError(f"storage: {tcfg.paths.storage!r} is a local path, but the cluster has {len(nodes)} "
                          "nodes: checkpoints and results need storage every node reaches; pass "
                          "--storage s3://bucket/runs (or gs://..., or a shared file system mounted on every node)")


def fit_demo_to_cluster(tcfg: TrainConfig) -> None:
    """The embedded demo on a small cluster: the tiny preset needs little, so when the workers'
    CPUs (1 each) would leave none for the ingest's decode tasks, give each a share."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    sc = tcfg.scale
    if cpus and sc.workers * sc.cpus_per_worker + 1 > cpus and not sc.gpus_per_worker:
        sc.cpus_per_worker = max(0.25, (cpus - 0.5) / (sc.workers + 1))
        tcfg.ingest.decode_cpus = tcfg.ingest.decode_cpus or sc.cpus_per_worker


def demo_data_root(tcfg: TrainConfig) -> str:
    """Where the embedded demo's shards go: ``AVMOE_DEMO_DIR``; else beside the runs when they
    are on object storage (every node reads them); else a per-user cache on this node."""
    if os.environ.get("AVMOE_DEMO_DIR"):
        return absolute_path(os.environ["AVMOE_DEMO_DIR"])
    if "://" in tcfg.paths.storage:
        return tcfg.paths.storage.rstrip("/") + "/demo-data"
    return os.path.join(os.path.dirname(tcfg.paths.storage.rstrip("/")), "demo-data")


def resume_command(task_name: str, argv: list[str], name: str, storage: str) -> str:
    """The exact command that continues this run (same flags, its name and storage)."""
    args = list(argv)
    for flag, value in (("--name", name), ("--storage", storage)):
        if flag not in args:
            args += [flag, value]
    cmd = f"python jobs/{task_name}.py " + shlex.join(args)
    if os.environ.get("RAY_JOB_ID"):
        cmd = "ray job submit --working-dir . -- " + cmd
    return cmd


def format_results(r: dict[str, Any], history: bool = True) -> str:
    """The results summary; ``history=False`` when the progress display printed the epochs."""
    from avmoe.console import metric_table

    primary = r["primary_metric"]
    lines = [f"run {r['run_name']} ({r['task']}, {r['world_size']} workers, ZeRO {r['zero_stage']})"] if history else []
    for h in r.get("history", []) if history else []:
        lines.append(f"  epoch {h['epoch']:3d}  step {h['step']:6d}  train_loss {h['train_loss']:.4f}  "
                     f"val {primary} {h['val'].get(primary, float('nan')):.4f}")
    b = r.get("best") or {}
    if b.get("epoch") is not None:
        lines.append(f"  best on validation: epoch {b['epoch']} ({primary} {b[f'val_{primary}']:.4f}, "
                     f"checkpoint {b['checkpoint']})")
    for key, title in (("test", "test"), ("test_drop_audio", "test, audio absent"),
                       ("test_drop_visual", "test, visual absent")):
        if key not in r:
            continue
        m = r[key]
        note = " (nan: no sample of that kind in the split)" if any(v != v for v in m.values()) else ""
        if len(m) <= 3:
            lines.append(f"  {title}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + note)
        else:
            lines.append(f"  {title}{note}:")
            lines.append(metric_table(m))
        if key == "test" and r.get("test_fallback"):
            lines.append(f"  note: {r['test_fallback']}")
    if r.get("stopped_at_max_steps"):
        lines.append("  stopped at max_steps: run again with the same --name to continue")
    if r.get("results_dir"):
        lines.append(f"  results: {r['results_dir']}/results.json (+ plots/, tensorboard/)")
    return "\n".join(lines)


def main(task_name: str, argv: list[str] | None = None) -> int:
    from avmoe.console import VERBOSE_ENV, quiet_process
    from avmoe.ray_env import apply_loopback_env, on_cluster

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"
    # before anything imports Ray: an embedded run stays on loopback (no-op on a cluster)
    apply_loopback_env()
    quiet_process()
    from avmoe.train.driver import fit, prepare
    from avmoe.train.resources import check_resources

    t0 = time.perf_counter()
    try:
        tcfg, demo, args = config_from_args(task_name, argv)
        if demo:  # check everything but the data before taking any Ray resource
            TrainConfig.from_dict(tcfg.to_dict()).apply({"data": "unused"}).validate()
            check_resources(tcfg)
        else:
            tcfg = prepare(tcfg)
        if args.print_config:
            if demo:
                tcfg = TrainConfig.from_dict(tcfg.to_dict()).apply({"data": "unused"})
            d = tcfg.to_dict()
            d["optim"] = tcfg.resolved_optim().to_dict()  # the values the run will use
            print(json.dumps(d, indent=1))
            return 0
        if demo and len(tcfg.get_task().demo_plan()) > 1:
            return run_demo_plan(task_name, argv, args, tcfg, t0)
        connect(tcfg)
        check_cluster(tcfg)
        if on_cluster():  # now that the cluster's size is known; before fit() takes anything
            check_resources(tcfg)
        if demo:
            from data_pipeline.demo import prepare_demo_shards

            fit_demo_to_cluster(tcfg)
            dataset = tcfg.get_task().dataset
            tcfg.paths.data = prepare_demo_shards(dataset, root=demo_data_root(tcfg), log=lambda *_: None)
            tcfg = prepare(tcfg)
            print(f"[{task_name}] no --data: the embedded demo (synthetic {dataset} shards at {tcfg.paths.data}, "
                  f"tiny preset)")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    name = tcfg.run_name()
    tcfg.paths.name = name
    where = "GPU" if tcfg.scale.gpus_per_worker else "CPU"
    print(f"[{task_name}] run {name} on {tcfg.scale.workers} {where} workers, ZeRO {tcfg.deepspeed.zero_stage}; "
          f"to continue it: {resume_command(task_name, argv, name, tcfg.paths.storage)}", flush=True)
    try:
        results = fit(tcfg, prepared=True, progress=True)
    except SystemExit:  # SIGTERM / SIGHUP (Ray's own shutdown then runs at exit)
        return stopped_by_signal(f"[{task_name}] stopped by signal {{sig}}; to resume from its latest checkpoint: "
                                 f"{resume_command(task_name, argv, name, tcfg.paths.storage)}")
    print(format_results(results, history=False) + f"; done in {time.perf_counter() - t0:.0f} s")
    return 0


def stopped_by_signal(message: str) -> int:
    """Inside ``except SystemExit``: a job ended by SIGTERM / SIGHUP says ``message`` (its
    ``{sig}`` filled in) and returns 128 + the signal; any other SystemExit goes on."""
    from avmoe.ray_env import termination_signal

    sig = termination_signal()
    if sig is None:
        raise
    print(message.replace("{sig}", str(sig)), file=sys.stderr)
    return 128 + sig


def run_demo_plan(task_name: str, argv: list[str], args: argparse.Namespace, base: TrainConfig, t0: float) -> int:
    """A task's embedded demo of several runs (``Task.demo_plan``): each run on its synthetic
    shards, in order, named ``<name>-<label>``; then the task's summary table. The user's flags
    apply to every run; running the same command with the run's ``--name`` again continues it."""
    from avmoe.ray_env import on_cluster
    from avmoe.train.driver import fit, prepare
    from avmoe.train.resources import check_resources
    from data_pipeline.demo import prepare_demo_shards

    task = base.get_task()
    plan = task.demo_plan()
    given = user_settings(task_name, args)
    name = base.paths.name or f"{task_name}-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    done: list = []
    run_dirs: dict[str, str] = {}
    try:
        connect(base)
        check_cluster(base)
        if on_cluster():
            check_resources(base)
        fit_demo_to_cluster(base)
        root = demo_data_root(base)
        print(f"[{task_name}] no --data: the embedded demo, {len(plan)} runs on synthetic data, tiny preset "
              f"({', '.join(r.label for r in plan)}); to continue it: "
              f"{resume_command(task_name, argv, name, base.paths.storage)}", flush=True)
        for run in plan:
            cfg = TrainConfig.of(task=task_name, variant=run.variant, storage=base.paths.storage)
            overrides = {k: (run_dirs[v[5:-1]] if isinstance(v, str) and v.startswith("{run:") else v)
                         for k, v in run.overrides.items()}
            cfg.apply(overrides).apply(given)
            cfg.scale, cfg.ingest = base.scale, base.ingest  # (as fitted to this cluster)
            cfg.evaluation.test, cfg.evaluation.plots = base.evaluation.test, base.evaluation.plots
            # a set of another size than the dataset's demo_size lives in its own directory
            run_root = root if not run.size else f"{root.rstrip('/')}/n{run.size}"
            cfg.paths.data = prepare_demo_shards(run.dataset, root=run_root, n=run.size, log=lambda *_: None)
            if run.eval_dataset:
                cfg.paths.eval_data = prepare_demo_shards(run.eval_dataset, root=run_root, n=run.size,
                                                          log=lambda *_: None)
            cfg.paths.name = f"{name}-{run.label}"
            cfg = prepare(cfg)
            print(f"[{task_name}] {run.label}: run {cfg.paths.name} on synthetic {run.dataset} shards"
                  + (f" (evaluated on {run.eval_dataset})" if run.eval_dataset else ""), flush=True)
            results = fit(cfg, prepared=True, progress=True)
            print(format_results(results, history=False), flush=True)
            done.append((run, results))
            run_dirs[run.label] = results["results_dir"]
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except SystemExit:  # SIGTERM / SIGHUP: the finished runs stay finished, the next call resumes
        return stopped_by_signal(f"[{task_name}] stopped by signal {{sig}} after {len(done)} of {len(plan)} runs; "
                                 f"to continue: {resume_command(task_name, argv, name, base.paths.storage)}")
    summary = task.demo_summary(done)
    if summary:
        print(summary)
    print(f"[{task_name}] demo done in {time.perf_counter() - t0:.0f} s")
    return 0
