"""A short real training run whose /metrics endpoint can be scraped: behind
``python -m avmoe.telemetry.render --demo`` and the telemetry tests.

It is the real trainer (``avmoe.train.Trainer`` via ``run_local``: one process, world size 1)
on packed synthetic AVE shards, with the tiny preset; nothing is simulated. The run executes in
a background thread; ``DemoRun`` exposes its endpoint, its progress, and (``hold_at_end``) keeps
the endpoint up after the last step until ``release()`` so a scraper can read the final values.
Needs Ray (the ingest's decode tasks): ``avmoe.ray_env.init_local_ray()`` first.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class _Stopped(Exception):
    pass


class DemoRun:
    def __init__(self, workdir: str, job: str = "demo", epochs: int = 3, n_train: int = 8, batch_size: int = 2,
                 sd_dir: str | None = None, hold_at_end: bool = False, data: str | None = None) -> None:
        self.workdir, self.job, self.epochs = str(workdir), job, epochs
        self.n_train, self.batch_size, self.sd_dir, self.data = n_train, batch_size, sd_dir, data
        self.hold_at_end = hold_at_end
        self.port: int | None = None
        self.steps = 0
        self.error: BaseException | None = None
        self.results: dict[str, Any] | None = None
        self.ready = threading.Event()  # the endpoint is up
        self.finished = threading.Event()  # training and its evaluation are done
        self._stop = threading.Event()
        self._release = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def config(self):
        from avmoe.train import TrainConfig, prepare
        from data_pipeline.demo import prepare_demo_shards

        data = self.data or prepare_demo_shards("ave", root=os.path.join(self.workdir, "data"), n=self.n_train,
                                                frame_size=32, workers=1, log=lambda *_: None)
        cfg = TrainConfig.of(task="ave", preset="tiny", data=data, storage=os.path.join(self.workdir, "runs"),
                             name=self.job, workers=1, epochs=self.epochs, batch_size=self.batch_size,
                             grad_accum=1, lr=1e-3, scheduler="none", shuffle_buffer=16, test=False,
                             metrics_address="127.0.0.1", metrics_port=0, metrics_sd_dir=self.sd_dir or "")
        return prepare(cfg)

    def start(self) -> "DemoRun":
        from avmoe.train import Trainer, run_local

        tcfg = self.config()
        demo = self

        class DemoTrainer(Trainer):
            def setup(self):
                super().setup()
                demo.port = self.metrics.port
                demo.ready.set()

            def after_step(self):
                demo.steps = self.state.step
                if demo._stop.is_set():
                    raise _Stopped

            def finish(self):
                super().finish()
                demo.finished.set()
                if demo.hold_at_end:
                    demo._release.wait(timeout=300)

        def target():
            try:
                self.results = run_local(tcfg, trainer_cls=DemoTrainer)
            except _Stopped:
                pass
            except BaseException as e:  # surfaced to the caller
                self.error = e
            finally:
                self.ready.set()
                self.finished.set()

        self._thread = threading.Thread(target=target, daemon=True, name=f"avmoe-demo-{self.job}")
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 120) -> "DemoRun":
        if not self.ready.wait(timeout):
            raise TimeoutError("the demo run did not start its metrics endpoint")
        if self.error is not None:
            raise self.error
        return self

    def release(self) -> None:
        self._release.set()

    def stop(self, timeout: float = 120) -> None:
        """Stop after the current step (or let a held run finish) and wait for the thread."""
        self._stop.set()
        self._release.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while self.alive() and time.time() < deadline:
            self._thread.join(0.2)
