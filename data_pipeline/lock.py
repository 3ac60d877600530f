"""The exclusive right to write one split at one output: two ``pack`` runs racing to the same
``--out`` and split, one wins, the other stops with a ``PackError`` before touching anything.

* Local disk: ``fcntl.flock`` on ``<out>/.{split}.pack-lock``. The kernel drops the lock when
  its process dies, so a killed pack never blocks the re-run that resumes it.
* Object storage: the lock object ``<out>/.{split}.pack-lock`` is created with a conditional
  write (S3 ``If-None-Match: *``; fsspec ``pipe_file(mode="create")``), which exactly one writer
  wins. It names its owner (host, pid, start time); a lock left by a killed pack on the same
  host (its pid is gone) is taken over, one left from another host is reported with the URL to
  delete. A filesystem without conditional writes gets a warning, not a lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time

from data_pipeline import storage
from data_pipeline.errors import PackError

log = logging.getLogger("data_pipeline.pack")


def lock_name(split: str) -> str:
    return f".{split}.pack-lock"


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"


def _pid_gone(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


class SplitLock:
    """``with SplitLock(fs, out_path, split, local):`` holds the split's lock."""

    def __init__(self, fs, out_path: str, split: str, local: bool, out_url: str):
        self.fs, self.split, self.local, self.out_url = fs, split, local, out_url
        self.path = storage.join(out_path, lock_name(split))
        self._fd: int | None = None
        self._held_remote = False

    def __enter__(self) -> "SplitLock":
        if self.local:
            self._lock_local()
        else:
            self._lock_remote()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, owner: dict | None, remedy: str = "") -> PackError:
        return PackError(f"{self.out_url}: another pack of split {self.split!r} is writing here "
                         f"({_describe(owner)}; lock {self.path}); this one stopped before "
                         f"writing anything{remedy}")

    # ------------------------------------------------------------------ local
    def _lock_local(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                try:
                    owner = json.loads(os.read(fd, 4096) or b"null")
                except ValueError:
                    owner = None
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(owner) from None
                raise PackError(f"{self.path}: cannot lock ({e.strerror})") from None
            try:  # the holder before us may have unlinked the file after we opened it
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        self._fd = fd

    # ------------------------------------------------------------------ object storage
    def _lock_remote(self) -> None:
        data = json.dumps(_owner()).encode()
        for attempt in range(2):
            try:
                self.fs.pipe_file(self.path, data, mode="create")
                self._held_remote = True
                return
            except FileExistsError:
                owner = self._read_owner()
                if attempt == 0 and owner is not None and _pid_gone(owner):
                    log.warning("taking over the lock %s left by a killed pack (%s)", self.path,
                                _describe(owner))
                    self.fs.rm_file(self.path)
                    continue
                raise self._busy(owner, f"; if that pack is no longer running, delete "
                                        f"{self.out_url.rstrip('/')}/{lock_name(self.split)} "
                                        "and re-run") from None
            except (TypeError, NotImplementedError):
                log.warning("%s cannot do conditional writes: packs racing to %s are not "
                            "detected", type(self.fs).__name__, self.out_url)
                return
        raise self._busy(self._read_owner())

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._held_remote:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
            self._held_remote = False
