"""The embedded Ray cleans up after itself: a job driver killed mid-run (SIGKILL, SIGTERM) leaves no
Ray process of its own running, and SIGHUP ends a driver through its atexit handlers.

Real subprocesses only; the test kills nothing but the pids it started and their descendants
(never ``ray stop`` or a kill by name: other runs share the machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import REPO  # noqa: E402
from train_fixtures import shards  # noqa: E402


def _env() -> dict[str, str]:
    """This session's loopback settings without its own Ray's variables (RAY_ADDRESS would make
    the job join the test session's Ray instead of embedding one)."""
    from avmoe.ray_env import loopback_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(loopback_env(os.environ["HOME"]), PYTHONPATH=str(REPO), AVMOE_METRICS="0")
    return env


def _record(proc: psutil.Process, seen: dict[int, tuple[float, str]]) -> None:
    """Every descendant of ``proc``: pid -> (start time, its current title: Ray workers and agents
    retitle themselves "ray::..." after they start)."""
    for c in proc.children(recursive=True):
        try:
            seen[c.pid] = (c.create_time(), " ".join(c.cmdline())[:80] or c.name())
        except psutil.Error:
            pass


def _running(seen: dict[int, tuple[float, str]]) -> dict[int, str]:
    """The recorded processes still running (same pid and start time; a zombie has ended)."""
    alive = {}
    for pid, (ctime, cmd) in seen.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = cmd
        except psutil.Error:
            pass
    return alive


# SIGKILL once the training worker runs (mid-run, the reported case); SIGTERM as soon as the
# driver waits on Ray Train's controller (what matters there is the driver's own exit path)
@pytest.mark.parametrize("sig, running", [(signal.SIGKILL, "RayTrainWorker"), (signal.SIGTERM, "TrainController")])
def test_a_killed_job_driver_leaves_no_ray_process(sig, running, tmp_path_factory, tmp_path):
    """``jobs/ave.py`` on its embedded Ray, killed mid-run. Before, SIGKILL
    left the raylet's ray::DashboardAgent and ray::RuntimeEnvAgent running (blocked reporting
    the raylet's death to the dead GCS), and SIGTERM aborted the driver (Ray's C++ failure-signal
    handler: exit -6, no shutdown)."""
    data = shards(tmp_path_factory, "ave", 8)
    cmd = [sys.executable, "jobs/ave.py", "--data", data, "--storage", str(tmp_path / "runs"), "--name", "killed",
           "--preset", "tiny", "--workers", "1", "--cpus-per-worker", "0.5", "--epochs", "50", "--batch-size", "2", "--grad-accum", "1",
           "decode_cpus=0.5", "shuffle_buffer=16", "--no-plots"]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    seen: dict[int, tuple[float, str]] = {}
    try:
        proc = psutil.Process(driver.pid)
        deadline = time.time() + 300
        while not any(running in c for _, c in seen.values()):
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            _record(proc, seen)
            time.sleep(0.5)
        time.sleep(2)  # what it starts, starts too
        _record(proc, seen)
        assert any("DashboardAgent" in c for _, c in seen.values()), seen  # what used to outlive it
        driver.send_signal(sig)
        code = driver.wait(timeout=120)
        # SIGTERM: a clean exit through Ray's atexit shutdown (it used to abort: exit -6)
        assert code == (-sig if sig == signal.SIGKILL else 128 + sig), code
        if sig == signal.SIGTERM:
            said = (tmp_path / "driver.log").read_text()
            assert "stopped by signal 15; to resume from its latest checkpoint: python jobs/ave.py" in said
            assert "--name killed" in said
        deadline = time.time() + 45
        while _running(seen) and time.time() < deadline:
            time.sleep(0.5)
        assert not _running(seen), f"left running after {sig.name}: {_running(seen)}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        for pid in _running(seen):  # ours only: recorded descendants, same start time
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        log.close()


def test_sighup_ends_the_driver_through_its_atexit_handlers():
    code = ("import atexit, sys, time\n"
            "from avmoe.ray_env import exit_on_termination_signals\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            "exit_on_termination_signals()\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGHUP)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 128 + signal.SIGHUP and "atexit ran" in out
    finally:
        if p.poll() is None:
            p.kill()


def test_the_loopback_environment_applied_twice_keeps_one_home(tmp_path):
    """A job applies it in its main and again in init_local_ray: the private HOME used to nest
    inside itself (~/.cache/avmoe/ray-home/.cache/avmoe/ray-home)."""
    env = {k: v for k, v in _env().items() if k not in ("AVMOE_CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    code = ("import os\n"
            "from avmoe.ray_env import apply_loopback_env\n"
            "homes = [apply_loopback_env(force=True)['HOME'] for _ in range(2)]\n"
            "print(homes[0]); print(homes[1])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(tmp_path / ".cache" / "avmoe" / "ray-home")] * 2
