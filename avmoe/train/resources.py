"""Does the run fit where it will run? Checked before any Ray resource is taken, so that a
``--workers`` the cluster (or this machine) cannot hold is a ``ConfigError`` naming the key
instead of a placement group that waits forever.

* Embedded run (no Ray yet, not on a cluster): this machine. The embedded Ray gets as many
  logical CPUs as the workers ask for (``cli.connect``), so the bound is real processes: at most
  one training worker per CPU core this process may use, and the GPUs torch sees.
* A Ray instance we are connected to: the most it can grow to, from its autoscaler's cluster
  config (what Ray Train itself checks, once its controller is running) when it has one, else
  its current resources.
"""

from __future__ import annotations

import os

from avmoe.config import ConfigError


def machine_resources() -> dict[str, float]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    import torch

    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def ray_resources() -> dict[str, float]:
    """The maximum resources of the connected Ray cluster."""
    import ray

    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # private API: fall back to what the cluster has now
        most = None
    return {k: float(v) for k, v in (most or ray.cluster_resources()).items()}


def check_resources(tcfg) -> None:
    """Raise ``ConfigError`` naming ``workers`` (or ``gpus_per_worker`` / ``cpus_per_worker``)
    if the run's workers cannot all be placed. On a cluster not yet connected to, nothing is
    checked (``cli.main`` checks again once connected)."""
    import ray

    from avmoe.ray_env import on_cluster

    sc = tcfg.scale
    if ray.is_initialized():
        have, where = ray_resources(), "the Ray cluster (at most, autoscaling included)"
        n = sc.min_workers if sc.elastic else sc.workers  # elastic: the group starts with what fits
        need = {"CPU": n * sc.cpus_per_worker, "GPU": n * sc.gpus_per_worker}
        for k, v in (sc.worker_resources or {}).items():
            if n * v > have.get(k, 0.0) + 1e-9:
                raise ConfigError(f"worker_resources: {n} workers need {n * v:g} {k!r}; {where} has "
                                  f"{have.get(k, 0.0):g} (node types offering it: see cluster/*.yaml)")
    elif on_cluster():
        return
    else:
        have, where = machine_resources(), "this machine (embedded Ray)"
        need = {"CPU": float(sc.workers), "GPU": sc.workers * sc.gpus_per_worker}
    for res, key in (("GPU", "gpus_per_worker"), ("CPU", "cpus_per_worker")):
        if need[res] > have.get(res, 0.0) + 1e-9:
            unit = "CPU cores" if res == "CPU" and not ray.is_initialized() else f"{res}s"
            per = "one process each" if res == "CPU" and not ray.is_initialized() else \
                f"{key} {getattr(sc, key):g} each"
            raise ConfigError(
                f"workers: {sc.workers} workers ({per}) need {need[res]:g} {unit}; {where} has "
                f"{have.get(res, 0.0):g}. Lower --workers (or --{key.replace('_', '-')})")
