"""Shared fixtures. The loopback environment is applied before anything imports Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avmoe.ray_env import apply_loopback_env

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_ANNOTATIONS = SHARED / "real-annotations"

# Tests keep their Ray HOME and caches in the repo's ignored .cache/ (never the user's HOME).
os.environ.setdefault("AVMOE_CACHE_DIR", str(REPO / ".cache" / "avmoe"))
apply_loopback_env(force=True)
for var in ("RAY_ADDRESS", "RAY_JOB_ID"):
    os.environ.pop(var, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout: float = 30) -> None:
    """SIGTERM a child we started (never `ray stop` / pkill: other runs share the machine),
    SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """One small synthetic dataset per layout, shared by the packer tests (read-only)."""
    from data_pipeline.datasets import list_datasets
    from data_pipeline.synth import synth

    root = tmp_path_factory.mktemp("synth")
    for task in list_datasets():
        synth(task, 6, str(root / task), seed=1, size=48)
    return root


@pytest.fixture
def copy_of(tmp_path, synth_root):
    """A private copy of one synthetic dataset, for tests that damage it."""

    def make(task: str) -> Path:
        dst = tmp_path / f"{task}-copy"
        shutil.copytree(synth_root / task, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1, with a bucket; yields its env."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(
            Bucket="avmoe-test")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    import fsspec

    fsspec.config.conf.clear()
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
    return s3_server


@pytest.fixture(scope="session")
def ray_local():
    from avmoe.ray_env import init_local_ray

    ray = init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
