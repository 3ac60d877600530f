"""Config checks that need the data or the machine, all before any Ray resource is taken:
``--workers`` beyond what this machine (embedded Ray) or the cluster can hold, ports outside
1..65535, a malformed metrics address, a batch larger than the split."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_jobs import no_ray  # noqa: E402,F401
from train_fixtures import base_config, shards  # noqa: E402

from avmoe.config import ConfigError  # noqa: E402
from avmoe.train import cli  # noqa: E402
from avmoe.train.driver import prepare  # noqa: E402


def cores() -> int:
    return len(os.sched_getaffinity(0))


def where_checked() -> str:
    """An embedded run checks this machine; once a Ray is running in this process (another
    test's ``ray_local``), the job would run on it and is checked against it."""
    import ray

    return "the Ray cluster" if ray.is_initialized() else "this machine (embedded Ray)"


@pytest.mark.parametrize("argv, says", [
    (["--metrics-port", "70000"], "metrics_port must be a TCP port in 1..65535"),
    (["--metrics-port", "-1"], "metrics_port must be a TCP port"),
    (["--metrics-address", "http://0.0.0.0:9460"], "metrics_address must be an IP address or a host"),
    (["--metrics-address", "bad host!"], "metrics_address"),
    (["--batch-size", "5", "--workers", "2"], "batch_size: 5 per worker x 2 workers = 10 samples "
                                              "per step, but the train split"),
    (["--min-workers", "3", "--workers", "2"], "min_workers (3) must be <= workers (2)"),
    (["--min-workers", "1", "--workers", "2", "--zero-stage", "1"],
     "min_workers=1 (elastic) needs zero_stage=0"),
    (["--worker-resources", "CPU=2"], "worker_resources: CPU is set by cpus_per_worker"),
    (["--worker-resources", "trainer=-1"], "worker_resources: trainer=-1"),
])
def test_config_checks_with_the_data(argv, says, no_ray, capsys, tmp_path_factory):  # noqa: F811
    data = shards(tmp_path_factory, "ave", 8)
    assert cli.main("ave", ["--data", data] + argv) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("var, value", [("AVMOE_METRICS_PORT", "abc"), ("AVMOE_METRICS_PORT", "99999"),
                                        ("AVMOE_METRICS_ADDR", "no such:addr"),
                                        ("AVMOE_METRICS_PORT_SLOTS", "0")])
def test_metrics_environment_checked_on_the_driver(var, value, monkeypatch, no_ray, capsys,  # noqa: F811
                                                   tmp_path_factory):
    data = shards(tmp_path_factory, "ave", 8)
    monkeypatch.setenv("RAY_JOB_ID", "01000000")  # a cluster job: its own AVMOE_* settings win
    monkeypatch.setenv(var, value)
    assert cli.main("ave", ["--data", data]) == 2
    assert var in capsys.readouterr().err


def test_more_workers_than_this_machine_holds(no_ray, capsys, tmp_path_factory, monkeypatch,  # noqa: F811
                                              tmp_path):
    data = shards(tmp_path_factory, "ave", 64)
    too_many = str(cores() + 1)
    assert cli.main("ave", ["--data", data, "--workers", too_many, "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert f"workers: {too_many} workers" in err and where_checked() in err
    # the embedded default checks before it generates its synthetic data
    monkeypatch.setenv("AVMOE_DEMO_DIR", str(tmp_path / "demo"))
    assert cli.main("ave", ["--workers", too_many]) == 2
    assert "workers" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_gpus_this_machine_does_not_have(no_ray, capsys, tmp_path_factory):  # noqa: F811
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    data = shards(tmp_path_factory, "ave", 8)
    assert cli.main("ave", ["--data", data, "--workers", "1", "--gpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err
    assert "need 1 GPUs; " in err and f"{where_checked()}" in err and "has 0" in err


def test_more_workers_than_the_connected_cluster_holds(ray_local, tmp_path_factory, tmp_path):
    from avmoe.train.resources import check_resources

    data = shards(tmp_path_factory, "ave", 8)
    total = ray_local.cluster_resources()["CPU"]
    cfg = base_config("ave", data, str(tmp_path), "big", workers=int(total) + 1, cpus_per_worker=1,
                      batch_size=1)
    with pytest.raises(ConfigError, match=rf"workers: {int(total) + 1} workers \(cpus_per_worker 1 "
                                          rf"each\) need {int(total) + 1} CPUs; the Ray cluster"):
        check_resources(cfg)
    check_resources(base_config("ave", data, str(tmp_path), "fits"))  # 2 x 0.5 CPU
    with pytest.raises(ConfigError, match="workers"):
        prepare(cfg)


def test_worker_resources_the_cluster_lacks(ray_local, tmp_path):
    """A custom worker resource no node offers would leave the placement group pending forever:
    a ConfigError naming the key instead."""
    from avmoe.train.resources import check_resources

    cfg = base_config("ave", "unused", str(tmp_path), "x", worker_resources={"trainer": 1})
    with pytest.raises(ConfigError, match="worker_resources: 2 workers need 2 'trainer'; the Ray cluster"):
        check_resources(cfg)
    # elastic: the group starts with min_workers, so that is what must fit
    cfg = base_config("ave", "unused", str(tmp_path), "x", workers=3, min_workers=1, cpus_per_worker=1)
    check_resources(cfg)
