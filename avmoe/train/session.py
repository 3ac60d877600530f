"""What the training loop needs from Ray Train, behind a small seam.

``RaySession`` is the real one (inside a ``TorchTrainer`` worker). ``LocalSession`` runs the
same loop in one process with a world-size-1 gloo group and a local storage directory; the
unit tests and the bare-loop benchmark use it, so the loop's logic (checkpoint contents,
resume, OGM-GE, evaluation) is tested without starting a worker group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator


class Session:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        raise NotImplementedError

    def open_checkpoint(self, dir_name: str) -> contextlib.AbstractContextManager[str]:
        """A reported checkpoint of this run, by its directory name, as a local directory."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open_checkpoint_path(self, path: str) -> Iterator[str]:
        """Any checkpoint directory by path or URL (``--eval-only``), as a local directory."""
        if "://" not in path or path.startswith("file://"):
            yield path.removeprefix("file://")
            return
        from ray.train import Checkpoint

        with Checkpoint(path=path).as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None,
               dir_name: str | None = None) -> None:
        raise NotImplementedError

    def wait_reports_committed(self, timeout_s: float = 120.0) -> None:
        """Block until the run's reported checkpoints are registered (before leaving on purpose:
        a report still in flight when the worker exits is lost to the restart)."""

    def preemption_notice(self) -> str | None:
        """Why this worker's node is going away (a drain: spot preemption notice, scale-down),
        or None. Local to this rank and cheap: the trainer agrees on it across ranks itself."""
        return None

    def write_run_files(self, local_dir: str) -> str:
        """Copy ``local_dir``'s files to the run's directory in storage; returns that location."""
        raise NotImplementedError

    def run_dir(self) -> str:
        """The run's directory in storage: a local path or a URL."""
        raise NotImplementedError


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=float))


class RaySession(Session):
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self._ctx = ctx

    def _storage(self):
        return self._ctx.get_storage()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    @contextlib.contextmanager
    def open_checkpoint(self, dir_name: str) -> Iterator[str]:
        from ray.train import Checkpoint

        st = self._storage()
        ckpt = Checkpoint(path=st.build_checkpoint_path_from_name(dir_name), filesystem=st.storage_filesystem)
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics, checkpoint_dir=None, dir_name=None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(_json_safe(metrics), checkpoint=ckpt,
                         checkpoint_dir_name=dir_name if checkpoint_dir else None)

    def wait_reports_committed(self, timeout_s: float = 120.0) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=timeout_s)  # (blocks on in-flight reports)

    def preemption_notice(self) -> str | None:
        # What Ray Train's PreemptionWatcher (polling the GCS for draining nodes) marked on this
        # worker. The public ray.train.get_preemption_info() reads the same value but is a
        # broadcast through Ray actors on every call: too costly per step, so the rank-local
        # value is read and the trainer all-reduces it with torch.distributed.
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            info = get_train_context().preemption_context.preemption_info
        except Exception:  # another Ray version or no watcher: no notice, Ray's own restart still works
            return None
        if info is None:
            return None
        return f"node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} draining (deadline_ms {info.deadline_ms})"

    def write_run_files(self, local_dir: str) -> str:
        import pyarrow.fs

        st = self._storage()
        dest = st.experiment_fs_path
        pyarrow.fs.copy_files(local_dir, dest, destination_filesystem=st.storage_filesystem)
        scheme = getattr(st.storage_filesystem, "type_name", "local")
        return dest if scheme == "local" else f"{scheme}://{dest}"

    def run_dir(self) -> str:
        st = self._storage()
        scheme = getattr(st.storage_filesystem, "type_name", "local")
        return st.experiment_fs_path if scheme == "local" else f"{scheme}://{st.experiment_fs_path}"


class LocalSession(Session):
    """Single process; checkpoints are directories under ``<storage>/<name>/``."""

    def __init__(self, storage: str, name: str) -> None:
        self.root = os.path.join(os.path.abspath(storage), name)
        os.makedirs(self.root, exist_ok=True)
        self.reports: list[dict[str, Any]] = []
        self._state = os.path.join(self.root, "local_session.json")

    def _latest_name(self) -> str | None:
        if os.path.exists(self._state):
            with open(self._state) as f:
                return json.load(f).get("latest")
        return None

    @contextlib.contextmanager
    def latest_checkpoint(self):
        name = self._latest_name()
        yield os.path.join(self.root, name) if name else None

    @contextlib.contextmanager
    def open_checkpoint(self, dir_name: str):
        yield os.path.join(self.root, dir_name)

    def report(self, metrics, checkpoint_dir=None, dir_name=None) -> None:
        self.reports.append(_json_safe(metrics))
        if checkpoint_dir:
            dest = os.path.join(self.root, dir_name)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dest)
            with open(self._state, "w") as f:
                json.dump({"latest": dir_name}, f)

    def write_run_files(self, local_dir: str) -> str:
        shutil.copytree(local_dir, self.root, dirs_exist_ok=True)
        return self.root

    def run_dir(self) -> str:
        return self.root


def init_local_process_group() -> None:
    """A world-size-1 gloo group on 127.0.0.1 (what Ray Train sets up for a real worker), its
    rendezvous store bound to loopback (``avmoe.train.process_group``)."""
    from avmoe.train.process_group import init_local_group

    init_local_group("gloo")
