"""The torch.distributed process group of a run, with its rendezvous store bound to the node's
address instead of every interface.

What listens during a Ray Train run (``ss -ltnp`` on an embedded run with 2 workers): every Ray
process (GCS, raylet, core workers, the dashboard agent), gloo's pair sockets and our metrics
servers listen on the node's address (127.0.0.1 in a local run), except **one**: the c10d
``TCPStore`` that rank 0 hosts for the ``env://`` rendezvous Ray Train's ``TorchConfig`` uses.
c10d binds its server socket to the wildcard address (``*:PORT``, IPv4 and IPv6) whatever host
it is given, and offers no option for the bind address; it does take an already listening
socket (``master_listen_fd``). So:

* rank 0 binds a socket to the node's address itself (``ray.util.get_node_ip_address()``, the
  ``MASTER_ADDR`` Ray Train would use), hosts the store on it (``serve_store``);
* every rank, rank 0 included, joins that store as a client: with
  ``TORCHELASTIC_USE_AGENT_STORE=True`` and ``MASTER_ADDR``/``MASTER_PORT`` naming it, torch's
  ``env://`` rendezvous only connects (``join_store``), as it does under torchelastic's agent;
* then the process group is set up with Ray's own ``_setup_torch_process_group`` (NCCL error
  handling included).

``BoundStoreTorchConfig`` is Ray Train's ``TorchConfig`` with that backend; ``init_local_group``
does the same for the one-process group of ``run_local``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_SERVED: list = []  # (socket, store) this process hosts: they live as long as the process


def serve_store(addr: str, world_size: int, timeout_s: float = 1800) -> tuple[str, int]:
    """Host a c10d ``TCPStore`` listening on ``addr`` only (port chosen by the kernel);
    returns ``(addr, port)``."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    store = dist.TCPStore(addr, port, world_size, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno())
    _SERVED.append((sock, store))
    return addr, port


def join_store(addr: str, port: int) -> None:
    """Make this process's ``env://`` rendezvous a client of the store at ``addr:port``."""
    os.environ.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True"})


def _serve_on_node_address(world_size: int, timeout_s: float) -> tuple[str, int]:
    import ray

    return serve_store(ray.util.get_node_ip_address(), world_size, timeout_s)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        import ray
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

        if not backend_config.backend:
            raise ValueError("BoundStoreTorchConfig needs an explicit backend (gloo or nccl)")
        n = len(worker_group)
        addr, port = worker_group.execute_single(0, _serve_on_node_address, world_size=n,
                                                 timeout_s=backend_config.timeout_s)
        worker_group.execute(join_store, addr=addr, port=port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            i, _setup_torch_process_group, backend=backend_config.backend, world_rank=i,
            world_size=n, init_method="env://", timeout_s=backend_config.timeout_s)
            for i in range(n)])


class BoundStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on the node's address only."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend


def init_local_group(backend: str = "gloo") -> None:
    """A world-size-1 process group on 127.0.0.1 (what the Ray Train backend sets up for a
    real worker), its store bound to loopback."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    addr, port = serve_store("127.0.0.1", 1)
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    join_store(addr, port)
    dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)
