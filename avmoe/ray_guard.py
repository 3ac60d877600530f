"""The clean-up guard of an embedded Ray: when its driver dies, however it dies, the processes that
driver's ``ray.init`` started go with it.

Ray 2.60 ties its head processes (GCS, raylet, ...) to the driver with ``PR_SET_PDEATHSIG``, and
its workers exit when their raylet does; but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a driver killed with SIGKILL: they notice their raylet is gone,
then block reporting it to the dead GCS. (SIGTERM made an embedded driver abort: Ray's C++
failure-signal handler replaces the Python one ``ray.init`` installs, so no ``atexit``
``ray.shutdown()`` ran either.) ``avmoe.ray_env.init_local_ray`` therefore

* turns SIGTERM / SIGHUP into ``SystemExit`` in the driver, so Ray's own ``atexit`` shutdown runs;
* starts this guard (``start_guard``): a small process in its own session (a Ctrl-C or a signal to
  the driver's process group does not reach it) reading a pipe from the driver. The driver sends
  the pids of the processes ``ray.init`` started and of their descendants then (the "roots": the
  agents are among them) and the session directory; the guard records the roots' descendants
  every second (a worker started in the last second dies with its raylet anyway). End of file on the pipe = the driver
  is gone: every recorded process still running 3 s later (same pid *and* start time: never a
  recycled pid) gets SIGTERM, then SIGKILL 3 s after that.

Only the driver's own Ray processes are ever touched: never a ``ray stop`` or a kill by name.
This file imports nothing from avmoe (it runs as ``python ray_guard.py`` from its path).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


class Guard:
    """The driver's end: the pipe to the guard process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def announce(self, roots: dict[int, float], session_dir: str | None) -> None:
        """Tell the guard the processes ``ray.init`` started ({pid: start time}) and its session."""
        lines = ["roots " + " ".join(f"{pid}:{ctime!r}" for pid, ctime in roots.items())]
        if session_dir:
            lines.append(f"session {session_dir}")
        try:
            self.proc.stdin.write(("\n".join(lines) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # the guard is gone: nothing to guard with
            pass


def start_guard() -> Guard:
    """Start the guard of this (driver) process; it lives until this process exits."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    # a forked child (exec'd ones never get the pipe) must not keep the guard waiting for its end
    os.register_at_fork(after_in_child=proc.stdin.close)
    return Guard(proc)


def started_since(before: set[int]) -> dict[int, float]:
    """{pid: start time} of this process's children that are not in ``before`` and of all their
    descendants (recorded here, while they are surely alive: a driver killed right after
    ``ray.init`` must not leave its agents unrecorded)."""
    import psutil

    out = {}
    for c in psutil.Process().children():
        if c.pid in before:
            continue
        try:
            for p in [c, *c.children(recursive=True)]:
                out[p.pid] = p.create_time()
        except psutil.Error:
            pass
    return out


def child_pids() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children()}


# --------------------------------------------------------------------------- the guard process


def _alive(psutil, pid: int, ctime: float):
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - ctime) > 1e-3 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def _record(psutil, roots: dict[int, float], tracked: dict[int, float]) -> None:
    """Add the running roots' descendants to ``tracked`` (one scan of the process table)."""
    live = [pid for pid, ctime in roots.items() if _alive(psutil, pid, ctime) is not None]
    if not live:
        return
    kids: dict[int, list[int]] = {}
    for p in psutil.process_iter(["ppid"]):
        kids.setdefault(p.info["ppid"], []).append(p.pid)
    todo = list(live)
    while todo:
        for child in kids.get(todo.pop(), ()):
            try:
                tracked[child] = psutil.Process(child).create_time()
            except psutil.Error:
                continue
            todo.append(child)


def _run(driver: int) -> int:
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        driver_ctime = psutil.Process(driver).create_time()
    except psutil.Error:
        return 0
    roots: dict[int, float] = {}
    tracked: dict[int, float] = {}
    session_dir = None
    stdin = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready:
            line = stdin.readline()
            if not line:
                break  # end of file: the driver exited (the kernel closed its end)
            word, _, rest = line.decode().strip().partition(" ")
            if word == "roots":
                for item in rest.split():
                    pid, _, ctime = item.partition(":")
                    roots[int(pid)] = float(ctime)
            elif word == "session":
                session_dir = rest
        _record(psutil, roots, tracked)
    deadline = time.time() + 10  # the driver is exiting: let it finish (its atexit shutdown)
    while _alive(psutil, driver, driver_ctime) is not None and time.time() < deadline:
        time.sleep(0.1)
    candidates = {**roots, **tracked}
    victims = [p for p in (_alive(psutil, pid, ct) for pid, ct in candidates.items()) if p is not None]
    victims = _wait(psutil, victims)  # (those still ending a clean shutdown go by themselves)
    if not victims:
        return 0
    names = sorted({_name(psutil, p) for p in victims})
    left = victims
    for how in ("terminate", "kill"):  # psutil checks the start time before it signals
        for p in left:
            try:
                getattr(p, how)()
            except psutil.Error:
                pass
        left = _wait(psutil, left)
        if not left:
            break
    print(f"avmoe ray guard: stopped {len(victims)} Ray process(es) left running after driver {driver} "
          f"exited ({', '.join(names)}){' of ' + session_dir if session_dir else ''}", file=sys.stderr)
    return 0


def _wait(psutil, procs: list, timeout: float = GRACE_S) -> list:
    """The processes of ``procs`` still running after ``timeout`` (a zombie has ended: it only
    waits for its new parent to reap it)."""
    deadline = time.time() + timeout
    while True:
        running = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p)
            except psutil.Error:
                pass
        if not running or time.time() >= deadline:
            return running
        procs = running
        time.sleep(0.1)


def _name(psutil, p) -> str:
    try:
        return " ".join(p.cmdline()[:1]) or p.name()
    except psutil.Error:
        return str(p.pid)


if __name__ == "__main__":
    sys.exit(_run(int(sys.argv[1])))
