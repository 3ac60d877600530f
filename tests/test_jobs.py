"""The job specs (jobs/*.py): config errors before any Ray resource, every shipped preset,
each job end to end on synthetic shards, eval-only / eval-drop (= the single-process metric),
and a real ``ray start --head`` + ``ray job submit --working-dir`` run.
"""

from __future__ import annotations

import json
import re
import os
import runpy
import shutil
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import REPO, free_port, stop_process  # noqa: E402
from train_fixtures import SDScraper, latest_checkpoint, shards  # noqa: E402

from avmoe.tasks import get_task, list_tasks, task_variants  # noqa: E402
from avmoe.train import ConfigError, TrainConfig, prepare  # noqa: E402
from avmoe.train import cli  # noqa: E402

FAST = ["--cpus-per-worker", "0.5", "--epochs", "1", "--batch-size", "2", "--grad-accum", "1",
        "decode_cpus=0.5", "metrics_address=127.0.0.1", "metrics_port=0", "shuffle_buffer=16", "--no-plots"]


# --------------------------------------------------------------------------- config (no Ray)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a job tries to take a cluster resource."""
    def refuse(*a, **k):
        raise AssertionError("a config error must be raised before connecting to Ray")
    monkeypatch.setattr(cli, "connect", refuse)


@pytest.mark.parametrize("argv, key", [
    (["no_such_key=1"], "no_such_key"),
    (["--workers", "two"], "workers"),
    (["--zero-stage", "5"], "zero_stage"),
    (["model.adapter.no_such=3"], "no_such"),
    (["model.num_segments=abc"], "model.num_segments"),
    (["--eval-drop", "smell"], "eval_drop"),
])
def test_config_errors_name_the_key(argv, key, no_ray, capsys, tmp_path_factory):
    data = shards(tmp_path_factory, "ave", 8)
    assert cli.main("ave", ["--data", data] + argv) == 2
    assert key in capsys.readouterr().err


def test_foreign_shards_and_disagreeing_sizes(no_ray, capsys, tmp_path_factory):
    # (no --data, on a cluster too, is the embedded demo: test_ray_job_submit_working_dir)
    ave = shards(tmp_path_factory, "ave", 8)
    assert cli.main("avqa", ["--data", ave]) == 2
    err = capsys.readouterr().err
    assert "data" in err and "'ave'" in err and "avqa" in err
    with pytest.raises(ConfigError, match="num_classes"):
        prepare(TrainConfig.of(task="ave", data=ave, model={"num_classes": 5}))
    prepare(TrainConfig.of(task="ave", data=ave, model={"num_classes": "28"}))  # the same value, as text


@pytest.mark.parametrize("name", task_variants())
@pytest.mark.parametrize("preset", ["tiny", "paper", "official"])
def test_every_shipped_preset_instantiates(name, preset):
    task = get_task(name)
    cfg = TrainConfig.of(task=task.name, variant=task.variant, preset=preset, data="s3://bucket/x").validate()
    model_cfg = cfg.task_config()
    assert model_cfg.preset == preset and cfg.resolved_optim().epochs >= 1
    for stage in (0, 1, 2, 3):
        TrainConfig.of(task=task.name, variant=task.variant, preset=preset, data="x", zero_stage=stage).validate()
    if preset == "tiny":
        assert task.build_model(model_cfg).trainable_parameters()
    # the embedded default of each job is a valid config too
    TrainConfig.of(task=task.name, variant=task.variant, data="x").apply(task.demo_schedule).validate()


@pytest.mark.parametrize("name", list_tasks())
def test_embedded_default_takes_the_tasks_demo_schedule(name):
    cfg, synthetic, _ = cli.config_from_args(name, [])
    assert synthetic
    opt = cfg.apply({"data": "x"}).resolved_optim()
    from avmoe.config import resolve_key

    for key, value in get_task(name).demo_schedule.items():
        path = resolve_key(cfg, key)  # an optimisation field (the task's default) or any other TrainConfig key
        obj = opt if path[0] == "optim" else cfg
        for p in path[1:-1] if path[0] == "optim" else path[:-1]:
            obj = getattr(obj, p)
        assert getattr(obj, path[-1]) == value, key


def test_job_scripts_match_the_registry():
    """One executable-as-typed script per registered task, each running that task; a task
    with variants takes them with its own option."""
    scripts = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))
    assert scripts == list_tasks()
    for name in scripts:
        text = (REPO / "jobs" / f"{name}.py").read_text()
        assert f'main("{name}", sys.argv[1:])' in text
        task = get_task(name)
        helptext = cli.build_parser(name).format_help()
        if task.variants:
            assert f"--{task.variant_option}" in helptext


def test_config_sections_grammar_and_print_config(no_ray, capsys, tmp_path_factory):
    data = shards(tmp_path_factory, "ave", 8)
    cfg = TrainConfig.of(task="ave", data=data, keep_checkpoints="3", **{"checkpoint.checkpoint_every": "2"})
    assert (cfg.checkpoint.keep_checkpoints, cfg.checkpoint.checkpoint_every) == (3, 2)
    cfg = TrainConfig.of(task="avs", setting="ms3", data="x")  # the task's own variant option
    assert cfg.variant == "ms3" and cfg.get_task().full_name == "avs-ms3"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="variants s4, ms3"):
        TrainConfig.of(task="avs", setting="ms5", data="x").validate()
    # --print-config shows the values the run uses, not the unset (None) task defaults
    assert cli.main("ave", ["--data", data, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["epochs"] == 50 and printed["optim"]["lr"] == 5e-4  # the paper AVE schedule
    assert printed["model"]["num_classes"] == 28  # from the shards' manifest


def test_deepspeed_json_is_merged_over_ours(tmp_path):
    from avmoe.train.engine import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000},
                                "gradient_clipping": 0.5}))
    cfg = TrainConfig.of(task="ave", data="x", deepspeed_config=str(user)).validate()
    ds = deepspeed_config(micro_batch=2, grad_accum=4, zero_stage=0, bf16=False, grad_clip=0.0,
                          user=cfg.deepspeed.overrides())
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match="deepspeed_config"):
        TrainConfig.of(task="ave", data="x", deepspeed_config="{not json").validate()


# --------------------------------------------------------------------------- jobs end to end


def run_job(task: str, argv: list[str], monkeypatch, capsys) -> str:
    """Run jobs/<task>.py itself (its __main__), in this process, on the session's Ray."""
    monkeypatch.setattr(sys, "argv", [f"jobs/{task}.py"] + argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "jobs" / f"{task}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    return out


# every job file runs; two of them with 2 workers (ZeRO 0 and 2), the others with 1 worker
E2E = [
    ("ave", "ave", ["--workers", "2", "--zero-stage", "0"]),
    ("avs", "avs-s4", ["--setting", "s4", "--workers", "2", "--zero-stage", "2"]),
    ("avvp", "avvp", ["--workers", "1", "--zero-stage", "2"]),
    ("avqa", "avqa", ["--workers", "1", "--zero-stage", "0", "--modulation", "ogm_ge"]),
]


@pytest.mark.parametrize("task, dataset, extra", E2E, ids=[e[1] for e in E2E])
def test_job_end_to_end(task, dataset, extra, tmp_path_factory, tmp_path, ray_local, monkeypatch, capsys):
    data = shards(tmp_path_factory, dataset, 8)
    # the driver's AVMOE_METRICS_SD_DIR reaches the workers; every rank announces its /metrics
    # there, and a scraper reads them over HTTP while the job runs
    sd_dir = tmp_path / "prometheus_sd"
    monkeypatch.setenv("AVMOE_METRICS_SD_DIR", str(sd_dir))
    with SDScraper(str(sd_dir)) as scraper:
        out = run_job(task, ["--data", data, "--storage", str(tmp_path), "--name", "e2e"] + FAST + extra,
                      monkeypatch, capsys)
    workers = int(extra[extra.index("--workers") + 1])
    assert scraper.targets and all(t.startswith("127.0.0.1:") for t in scraper.targets), scraper.targets
    for rank in range(workers):
        seen = scraper.values("avmoe_samples_total", job="e2e", task=dataset, rank=str(rank))
        assert len(set(seen)) >= 2 and max(seen) > 0, (rank, sorted(set(seen)))  # values change while it runs
        assert all(lab.get("node") for _, n, lab, _ in scraper.samples if n == "avmoe_samples_total")
        assert scraper.values("avmoe_loss", job="e2e", rank=str(rank))
        assert scraper.values("avmoe_flops_per_sample", job="e2e", rank=str(rank))  # every task head measures
    assert not list(sd_dir.glob("*.json"))  # ranks withdraw their targets when the job ends
    r = json.load(open(tmp_path / "e2e" / "results.json"))
    primary = get_task(task).primary_metric
    assert len(r["history"]) == 1 and r["history"][0]["step"] >= 1
    assert primary in r["history"][0]["val"] and primary in r["test"]
    assert r["best"]["checkpoint"] == os.path.basename(latest_checkpoint(str(tmp_path / "e2e")))
    # the test block: its heading ("test:" or "test (nan: ...):") then the metric rows, up to "results:"
    lines = out.splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r"\s*test( \(nan:[^)]*\))?:", ln)]
    assert len(starts) == 1, out[-2000:]
    block = [lines[starts[0]].split(":", 1)[1] if "(nan" not in lines[starts[0]] else ""]
    for ln in lines[starts[0] + 1:]:
        if ln.strip().startswith("results:"):
            break
        block.append(ln)
    assert re.search(rf"(^|\s){re.escape(primary)}\s+{r['test'][primary]:.4f}(,|\s|$)", "\n".join(block), re.M), out[-2000:]
    if task == "ave":  # the eval-only test reuses this run (its fixture trains one when absent)
        shutil.copytree(tmp_path, tmp_path_factory.getbasetemp() / "ave-e2e-run", dirs_exist_ok=True)


@pytest.fixture
def ave_run_on_2_workers(tmp_path_factory, ray_local):
    """The run of test_job_end_to_end[ave] (2 workers, ZeRO 0), trained here if that test did
    not run in this session."""
    run = tmp_path_factory.getbasetemp() / "ave-e2e-run"
    if not (run / "e2e" / "results.json").exists():
        task, dataset, extra = E2E[0]
        assert task == dataset == "ave"
        argv = ["--data", shards(tmp_path_factory, "ave", 8), "--storage", str(run), "--name", "e2e"] + FAST + extra
        assert cli.main("ave", argv) == 0
    return run


def test_eval_only_and_eval_drop_equal_single_process_metric(ave_run_on_2_workers, tmp_path_factory, tmp_path,
                                                             ray_local, monkeypatch, capsys):
    """--eval-only CHECKPOINT with --eval-drop, on 1 worker although the checkpoint was trained
    on 2 (ZeRO 0-2 checkpoints evaluate on any worker count); the metric equals a
    single-process evaluation of the same weights in split order."""
    run = ave_run_on_2_workers
    data = shards(tmp_path_factory, "ave", 8)
    ck = latest_checkpoint(str(run / "e2e"))
    run_job("ave", ["--eval-only", ck, "--eval-drop", "audio", "--data", data, "--storage", str(tmp_path),
                    "--name", "evalonly"] + FAST + ["--workers", "1"], monkeypatch, capsys)
    r = json.load(open(tmp_path / "evalonly" / "results.json"))
    trained = json.load(open(os.path.join(ck, "trainer.json")))["meta"]
    assert trained["world_size"] == 2 and r["world_size"] == 1
    assert r["history"] == [] and r["test_checkpoint"] == ck

    # single process, same weights, the test split in manifest order
    from avmoe.tasks import get_task
    from avmoe.train import checkpoint as ckpt_io
    from data_pipeline.ingest import IngestConfig, ShardStream

    cfg = TrainConfig.from_dict(r["config"]).task_config()
    task = get_task("ave")
    torch.manual_seed(999)  # the frozen (random, tiny) backbones: the trainer's init seed
    model = task.build_model(cfg)
    missing = model.load_state_dict(ckpt_io.trainable_state(ck), strict=False)
    assert not missing.unexpected_keys
    model.eval()
    stream = ShardStream(IngestConfig(url=data, split="test", batch_size=2, shuffle=False, drop_last=False))
    for drop, key in ((None, "test"), ("audio", "test_drop_audio")):
        acc = task.metric_accumulator(cfg)
        with torch.no_grad():
            for b in stream.epoch(0):
                b = b.drop(drop) if drop else b
                acc.update(task.predict(model(b), b), b)
        assert acc.compute() == pytest.approx(r[key], abs=1e-12), (drop, r[key])


# --------------------------------------------------------------------------- ray job submit


def test_ray_job_submit_working_dir(tmp_path):
    """A real head (`ray start --head`, 2 CPUs, loopback) and, as a user types them,
    `ray job submit --working-dir . -- python jobs/avqa.py` (no other argument: the embedded demo,
    packed where the cluster's workers read it, trained and tested) and
    `ray job submit --working-dir . -- jobs/avqa.py --epochs 1` (the script itself as the
    entrypoint), both to SUCCEEDED with their test metrics in the output; the first job's own
    output stays short. Then that head is stopped."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port, dash, client = free_port(), free_port(), free_port()
    # Every per-node port off its default: the session's embedded Ray (ray_local) may hold the
    # defaults (dashboard agent 52365, ...), and a head whose job agent cannot bind answers
    # every submission with "No available agent to submit job".
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    # a clean environment: this test process runs the session's embedded Ray, and variables
    # that ray.init leaves in os.environ (RAY_*) must not leak into the separate head's processes
    from avmoe.ray_env import loopback_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(loopback_env(os.environ["HOME"]))
    # what a user has: the venv on PATH (`jobs/avqa.py`'s shebang finds its python3), and here
    # the jobs' default storage (and the demo data beside it) in this test's directory
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    storage = tmp_path / "runs"
    env["AVMOE_STORAGE"] = str(storage)
    # its own temp dir (short: unix socket paths): the session's embedded Ray and other
    # clusters on this machine share /tmp/ray otherwise, and the head's job agent got confused
    temp = f"/tmp/avmoe-head-{port}"
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--ray-client-server-port={client}", "--disable-usage-stats", f"--temp-dir={temp}"] + agent_ports,
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    try:
        jenv = dict(env, RAY_ADDRESS=f"http://127.0.0.1:{dash}")
        deadline = time.time() + 60
        while subprocess.run([ray_bin, "job", "list"], env=jenv, capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, open(tmp_path / "head.log").read()[-3000:]
            time.sleep(1)

        def submit(sub_id: str, entrypoint: list[str]):
            cmd = [ray_bin, "job", "submit", "--submission-id", sub_id, "--working-dir", str(REPO), "--"] + entrypoint
            deadline = time.time() + 240
            while True:  # the head's job agent comes up a little after the dashboard answers
                p = subprocess.run(cmd, env=jenv, capture_output=True, text=True, timeout=600)
                if "No available agent" not in p.stdout + p.stderr or time.time() > deadline:
                    return p
                time.sleep(3)

        from ray.job_submission import JobStatus, JobSubmissionClient

        jobs = JobSubmissionClient(jenv["RAY_ADDRESS"])
        for n, entrypoint in enumerate((["python", "jobs/avqa.py"], ["jobs/avqa.py", "--epochs", "1"])):
            sub_id = f"avmoe-test-{port}-{n}"
            p = submit(sub_id, entrypoint)
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
            assert jobs.get_job_status(sub_id) == JobStatus.SUCCEEDED
            assert "no --data: the embedded demo" in p.stdout and "Overall" in p.stdout  # the printed test metrics
            log = jobs.get_job_logs(sub_id).splitlines()
            assert len(log) <= 40, "\n".join(log)  # the job's own output: no library chatter
        runs = sorted(d.name for d in storage.iterdir())
        assert len(runs) == 2 and all((storage / r / "results.json").exists() for r in runs)
        # what `--working-dir .` uploads: the source only (.rayignore + .gitignore leave out .venv,
        # .git, data, .cache, runs, ...), packaged the way Ray packages it
        import zipfile

        from ray._private.runtime_env.packaging import create_package

        pkg = tmp_path / "pkg.zip"
        create_package(str(REPO), pkg, include_gitignore=True)
        names = zipfile.ZipFile(pkg).namelist()
        assert pkg.stat().st_size < 20 * 2**20, pkg.stat().st_size
        assert "jobs/ave.py" in names and "avmoe/train/trainer.py" in names
        assert not [n for n in names if n.split("/")[0] in (".venv", ".git", "data", ".cache", "runs")]
    finally:
        # by its pid (SIGTERM drains the node; stack.md §4), not `ray stop`, which would kill
        # every Ray process on the machine, other sessions' included
        stop_process(head, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
