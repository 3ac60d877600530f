"""Run-time hygiene for Ray, in one place (../shared/spec/stack.md §10).

Ray 2.60 left alone resolves 127.0.0.1 to the eth0 address, probes cloud-metadata endpoints
(169.254.169.254) on every start, and pings usage-stats.ray.io even with stats disabled.
``loopback_env()`` is the environment that keeps every Ray process on 127.0.0.1; tests and the
embedded demo apply it. On a real cluster (``RAY_ADDRESS`` set, or a driver launched by
``ray job submit``) nothing is forced: the cluster's own settings win.
"""

from __future__ import annotations

import os
from pathlib import Path

BOOTSTRAP_CONFIG = "provider:\n  type: local\n"

# Variables every Ray process of a local run gets. HOME is added by loopback_env().
LOOPBACK_VARS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1; do not rewrite to eth0
    "RAY_AUTH_MODE": "token",  # explicit: token auth otherwise depends on ~/.ray state
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "AWS_EC2_METADATA_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
    "AVMOE_METRICS_ADDR": "127.0.0.1",  # worker /metrics servers bind loopback only
}


def cache_root() -> Path:
    """``AVMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/avmoe`` or ``~/.cache/avmoe``."""
    return Path(os.environ.get("AVMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "avmoe"))


def default_home() -> Path:
    """A private HOME holding ``ray_bootstrap_config.yaml`` (stops the metadata probes)."""
    return cache_root() / "ray-home"


def on_cluster() -> bool:
    """True when this process talks to an existing cluster rather than an embedded one."""
    return bool(os.environ.get("RAY_ADDRESS")) or bool(os.environ.get("RAY_JOB_ID"))


def loopback_env(home: str | os.PathLike | None = None) -> dict[str, str]:
    """The loopback environment, creating the private HOME and its bootstrap file."""
    home_path = Path(home) if home is not None else default_home()
    home_path.mkdir(parents=True, exist_ok=True)
    cfg = home_path / "ray_bootstrap_config.yaml"
    if not cfg.exists() or cfg.read_text() != BOOTSTRAP_CONFIG:
        cfg.write_text(BOOTSTRAP_CONFIG)
    env = dict(LOOPBACK_VARS)
    env["HOME"] = str(home_path)
    # the cache root is pinned before HOME changes: applied again (a job's main, then
    # init_local_ray) the private HOME must not nest inside itself (~/.cache/avmoe/ray-home/.cache/...)
    env["AVMOE_CACHE_DIR"] = str(cache_root())
    # torch's JIT extension cache (DeepSpeed's CPU comm op) otherwise follows HOME and is
    # rebuilt (~40 s) for every new private HOME; keep it in the shared cache instead.
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.environ.get("TORCH_EXTENSIONS_DIR") or str(home_path.parent / "torch_extensions"),
    )
    return env


def apply_loopback_env(home: str | os.PathLike | None = None, force: bool = False) -> dict[str, str]:
    """Put the loopback environment into ``os.environ`` (before ``import ray`` starts anything).

    Does nothing on a cluster unless ``force``; returns what it applied.
    """
    if on_cluster() and not force:
        return {}
    env = loopback_env(home)
    os.environ.update(env)
    return env


def init_local_ray(num_cpus: int | None = None, **kwargs):
    """Start an embedded, loopback-only Ray (``address="local"`` ignores a stale
    ``/tmp/ray/ray_current_cluster``) that cleans up after itself: SIGTERM / SIGHUP end the
    driver through ``SystemExit`` (so Ray's ``atexit`` shutdown runs), and a guard process stops
    whatever of this Ray outlives the driver, SIGKILL included (``avmoe.ray_guard``)."""
    apply_loopback_env()
    import ray

    from avmoe import ray_guard

    if ray.is_initialized():
        return ray
    guard = ray_guard.start_guard()
    before = ray_guard.child_pids() | {guard.proc.pid}
    kwargs.setdefault("include_dashboard", False)
    ctx = ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )
    guard.announce(ray_guard.started_since(before), ctx.address_info.get("session_dir"))
    exit_on_termination_signals()
    return ray


_RECEIVED: list[int] = []  # the termination signals this process got (Ray may re-raise SystemExit(1))


def _exit(signum, frame) -> None:
    _RECEIVED.append(signum)
    raise SystemExit(128 + signum)


def termination_signal() -> int | None:
    """The SIGTERM / SIGHUP that ended this driver, if one did (``exit_on_termination_signals``)."""
    return _RECEIVED[-1] if _RECEIVED else None


def exit_on_termination_signals() -> None:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the main thread, so that
    ``atexit`` handlers (``ray.shutdown``) run. Called after ``ray.init``: Ray's core worker
    installs a C++ failure-signal handler over the Python one ``ray.init`` set for SIGTERM, and
    an embedded driver then aborts on SIGTERM (exit -6, no shutdown); installing ours again puts
    Python's handler back. A handler someone else installed is kept."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        current = signal.getsignal(sig)
        if current in (signal.SIG_DFL, _exit) or getattr(current, "__module__", "").startswith("ray."):
            signal.signal(sig, _exit)
