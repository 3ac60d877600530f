"""The user path of a job: scripts executable as typed, paths resolved on the driver, a durable
default storage, --help with defaults and choices, the quiet console and its progress display,
the results table, TensorBoard scalars (read back with tensorboard's own reader), the runs
listing, decode placement and the tracking backends."""

from __future__ import annotations

import io
import json
import os
import pwd
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import REPO  # noqa: E402
from train_fixtures import base_config, shards  # noqa: E402

from avmoe.tasks import get_task, list_tasks  # noqa: E402
from avmoe.train import ConfigError, TrainConfig, prepare, run_local  # noqa: E402
from avmoe.train import cli  # noqa: E402


@pytest.mark.parametrize("name", list_tasks())
def test_job_scripts_run_as_typed(name):
    path = REPO / "jobs" / f"{name}.py"
    assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env python3\n")


def test_relative_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, demo, _ = cli.config_from_args("ave", ["--data", "shards/ave", "--storage", "runs", "eval_only=ck/x",
                                                "model.visual.weights=w/swin.safetensors"])
    assert not demo and cfg.model["visual.weights"] == str(tmp_path / "w/swin.safetensors")
    assert cfg.paths.data == str(tmp_path / "shards/ave") and cfg.paths.storage == str(tmp_path / "runs")
    assert cfg.evaluation.eval_only == str(tmp_path / "ck/x")
    cfg, _, _ = cli.config_from_args("ave", ["--data", "s3://bucket/shards", "--storage", "gs://b/runs"])
    assert (cfg.paths.data, cfg.paths.storage) == ("s3://bucket/shards", "gs://b/runs")  # URLs untouched


def test_default_storage_is_a_durable_per_user_directory(monkeypatch):
    monkeypatch.delenv("AVMOE_STORAGE", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", "/somewhere/else")  # the loopback environment's private HOME is not it
    home = pwd.getpwuid(os.getuid()).pw_dir
    assert cli.default_storage() == os.path.join(home, ".local", "share", "avmoe", "runs")
    monkeypatch.setenv("AVMOE_STORAGE", "s3://bucket/runs")
    assert cli.default_storage() == "s3://bucket/runs"
    cfg, demo, _ = cli.config_from_args("avqa", [])
    assert demo and cfg.paths.storage == "s3://bucket/runs"
    assert cli.demo_data_root(cfg) == "s3://bucket/runs/demo-data"  # the workers read the demo there


def test_resume_command_is_exact(monkeypatch):
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    cmd = cli.resume_command("avs", ["--setting", "ms3", "--epochs", "3"], "avs-ms3-tiny-x", "/r")
    assert cmd == "python jobs/avs.py --setting ms3 --epochs 3 --name avs-ms3-tiny-x --storage /r"
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert cli.resume_command("ave", ["--name", "a"], "a", "s3://b").startswith(
        "ray job submit --working-dir . -- python jobs/ave.py --name a --storage s3://b")


def test_help_lists_every_flag_with_default_and_choices():
    for name in list_tasks():
        task = get_task(name)
        text = cli.build_parser(name).format_help()
        for flag in cli.FLAGS:
            assert flag in text
        assert "one of 0, 1, 2, 3; default: 0" in text  # --zero-stage
        assert "one of 'tiny', 'paper', 'official'; default: 'tiny'" in text
        lr = task.training_defaults("paper").lr
        assert f"default: the task's ({lr} for the paper preset" in " ".join(text.split())
        assert "--verbose" in text and "--print-config" in text


def test_results_table_names_absent_subtypes():
    r = {"run_name": "r", "task": "avqa", "world_size": 2, "zero_stage": 0, "primary_metric": "Overall",
         "history": [{"epoch": 0, "step": 4, "train_loss": 1.5, "val": {"Overall": 0.5}}],
         "best": {"epoch": 0, "checkpoint": "epoch-0001-step-0000004", "val_Overall": 0.5},
         "test": {"Audio/Counting": 0.5, "Audio/Comparative": float("nan"), "Audio": 0.5, "Visual/Counting": 1.0,
                  "Visual/Location": 0.0, "Visual": 0.5, "Overall": 0.5}}
    text = cli.format_results(r, history=False)
    assert "epoch   0" not in text  # the progress display printed the epochs already
    lines = text.splitlines()
    assert lines[0].startswith("  best on validation: epoch 0 (Overall 0.5000")
    assert lines[1] == "  test (nan: no sample of that kind in the split):"
    assert lines[2].split() == ["Audio", "Counting", "0.5000", "Comparative", "nan", "(all", "0.5000)"]
    assert lines[3].split() == ["Visual", "Counting", "1.0000", "Location", "0.0000", "(all", "0.5000)"]
    assert lines[4].split() == ["Overall", "0.5000"]
    assert "epoch   0  step      4" in cli.format_results(r)


def test_driver_drops_known_ray_noise_and_keeps_the_rest(monkeypatch):
    """The lines Ray echoes from its processes pass through the quiet console's filter: Ray
    Train's PreemptionWatcher core-worker ERROR (printed on every run) goes, any other line -- a
    worker's real error included -- stays."""
    import ray._private.worker as ray_worker

    from avmoe import console

    monkeypatch.setattr(ray_worker, "print_worker_logs", ray_worker.print_worker_logs)
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    noise = ("[2026-12-01 21:10:06,763 E 11841 11904] core_worker.cc:2465: Actor with class name: "
             "'PreemptionWatcher' and ID: '48af' has constructor arguments in the object store and "
             "max_restarts > 0. If the arguments in the object store go out of scope ...")
    real = "Traceback (most recent call last): ValueError: bad sample"
    data = {"pid": 1234, "ip": "127.0.0.1", "localhost": "127.0.0.1", "lines": [noise, real], "is_err": True}
    console.quiet_process()
    out = io.StringIO()
    ray_worker.print_worker_logs(data, out)
    assert real in out.getvalue() and "PreemptionWatcher" not in out.getvalue()
    out = io.StringIO()
    ray_worker.print_worker_logs(dict(data, lines=[noise]), out)
    assert out.getvalue() == ""  # a batch of noise only prints nothing (not an empty prefix line)
    console.quiet_process()  # installed once, not wrapped again
    assert getattr(ray_worker.print_worker_logs, "_avmoe_filtered", False)


def test_progress_printer_draws_epochs():
    from avmoe.train.progress import Progress, ProgressPrinter

    out = io.StringIO()  # not a terminal: no bar for a short epoch, the epoch line says it
    p = Progress(ProgressPrinter(out), rank=0)
    p.emit("epoch_start", epoch=0, epochs=2, steps=3)
    for k in (1, 2, 3):
        p.emit("step", steps=k, loss=1.0 / k, samples_per_s=10.0, data_wait=0.25)
    p.emit("epoch_end", epoch=0, epochs=2, step=3, train_loss=0.61, metric="acc", val=0.5, best=True, seconds=1.2)
    Progress(ProgressPrinter(out), rank=1).emit("message", text="never: rank 1 does not print")
    assert out.getvalue().splitlines() == ["epoch 1/2  step 3  train_loss 0.6100  val acc 0.5000  (best)  [1 s]"]


def test_decode_resources_and_tracking_choices():
    cfg = TrainConfig.of(task="ave", data="x", decode_resources="ingest=1", decode_cpus="0.5").validate()
    assert cfg.ingest.resources() == {"ingest": 1, "CPU": 0.5}
    assert TrainConfig.of(task="ave", data="x").ingest.resources() is None  # the ingest's default
    cfg, _, _ = cli.config_from_args("ave", ["--data", "x", "--decode-resources", "CPU=2,ingest=1"])
    assert cfg.ingest.decode_resources == {"CPU": 2, "ingest": 1}
    with pytest.raises(ConfigError, match="decode_resources: ingest=-1"):
        TrainConfig.of(task="ave", data="x", decode_resources="ingest=-1").validate()
    with pytest.raises(ConfigError, match="unknown tracking backend 'neptune'"):
        TrainConfig.of(task="ave", data="x", tracking="tensorboard,neptune").validate()
    for backend in ("mlflow", "wandb"):
        import importlib.util

        if importlib.util.find_spec(backend) is None:  # not pinned: a clear message, before any Ray
            with pytest.raises(ConfigError, match=f"needs the '{backend}' package"):
                TrainConfig.of(task="ave", data="x", tracking=backend).validate()
    TrainConfig.of(task="ave", data="x", tracking="none").validate()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, ray_local):
    """One real run (1 process, world 1, 2 epochs) with TensorBoard tracking, plus a second run of
    the same config stopped at max_steps (incomplete)."""
    data = shards(tmp_path_factory, "ave", 8)
    storage = tmp_path_factory.mktemp("tracked")
    full = run_local(prepare(base_config("ave", data, str(storage), "tb", workers=1, epochs=2)))
    run_local(prepare(base_config("ave", data, str(storage), "cut", workers=1, epochs=2, max_steps=1)))
    return storage, full


def test_tensorboard_scalars_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage, r = tracked_run
    acc = EventAccumulator(str(storage / "tb" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_second", "train/data_wait_ratio",
                "epoch/train_loss", "val/acc", "test/acc"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("router/") for t in tags)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, r["history"][-1]["step"] + 1))  # one per optimiser step
    assert [e.value for e in acc.Scalars("val/acc")] == pytest.approx([h["val"]["acc"] for h in r["history"]])
    assert [e.value for e in acc.Scalars("epoch/train_loss")] == pytest.approx([h["train_loss"] for h in r["history"]])
    assert acc.Scalars("test/acc")[-1].value == pytest.approx(r["test"]["acc"])
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))  # without clipping too


def test_runs_list_and_show(tracked_run, capsys):
    from avmoe import runs

    storage, r = tracked_run
    infos = {i.name: i for i in runs.list_runs(str(storage))}
    assert set(infos) == {"tb", "cut"}
    tb, cut = infos["tb"], infos["cut"]
    assert tb.status == "finished" and tb.task == "ave" and tb.resume is None
    assert tb.best == f"acc {r['best']['val_acc']:.4f} (epoch {r['best']['epoch']})"
    assert tb.latest_checkpoint == f"epoch-0002-step-{r['history'][-1]['step']:07d}"
    assert cut.status == "stopped" and cut.latest_checkpoint == "epoch-0000-step-0000001"
    assert cut.resume == f"python jobs/ave.py --name cut --storage {storage} --data {r['config']['paths']['data']}"
    assert runs.main(["list", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "stopped" in out and "resume cut:" in out
    assert runs.main(["show", "tb", "--storage", str(storage)]) == 0
    assert "test:" in capsys.readouterr().out
    assert runs.main(["show", "nope", "--storage", str(storage)]) == 1
    assert json.loads((storage / "tb" / "results.json").read_text())["test"] == r["test"]
