"""Training progress on the driver's console: a tqdm bar per epoch (steps, samples/s, loss,
data-wait %, ETA), a line per epoch with its validation metric, and the evaluations.

Rank 0 of the worker group emits events (``Progress.emit``); on Ray they go, fire-and-forget,
into a small actor (``ProgressBoard``) that the driver polls from a thread while ``fit()``
blocks (workers' own stdout would reach the driver only line by line, prefixed, so a bar cannot
be drawn from there). In one process (``run_local``) events go straight to the printer.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class ProgressPrinter:
    """Draws the events: one tqdm bar per epoch, a summary line per epoch, evaluation lines."""

    def __init__(self, file=None) -> None:
        self.file = file or sys.stdout
        self.bar = None
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())

    def handle(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "epoch_start":
            from tqdm import tqdm

            self.close_bar()
            # not a terminal (a job's log, which Ray streams line by line, "\r" included): a bar
            # line only every 30 s and none for an epoch shorter than that; the epoch line says it
            self.bar = tqdm(total=e["steps"], initial=e.get("done", 0), desc=f"epoch {e['epoch'] + 1}/{e['epochs']}",
                            unit="step", file=self.file, dynamic_ncols=self.tty, ncols=None if self.tty else 110,
                            mininterval=0.5 if self.tty else 30.0, delay=0 if self.tty else 30.0,
                            leave=self.tty, disable=False)
        elif kind == "step" and self.bar is not None:
            self.bar.set_postfix_str(f"loss {e['loss']:.4f}, {e['samples_per_s']:.1f} samples/s, "
                                     f"data wait {100 * e['data_wait']:.0f}%", refresh=False)
            self.bar.update(e["steps"] - self.bar.n)
        elif kind == "epoch_end":
            self.close_bar()
            val = e.get("val")
            line = f"epoch {e['epoch'] + 1}/{e['epochs']}  step {e['step']}  train_loss {e['train_loss']:.4f}"
            if val is not None:
                line += f"  val {e['metric']} {val:.4f}" + ("  (best)" if e.get("best") else "")
            print(line + f"  [{e['seconds']:.0f} s]", file=self.file, flush=True)
        elif kind == "message":
            self.close_bar()
            print(e["text"], file=self.file, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Progress:
    """The trainer's side: ``emit`` on rank 0 (a no-op elsewhere and when disabled)."""

    def __init__(self, sink=None, rank: int = 0) -> None:
        self.sink, self.rank = sink, rank

    def emit(self, event: str, **fields: Any) -> None:
        if self.sink is None or self.rank != 0:
            return
        e = {"event": event, "time": time.time(), **fields}
        if isinstance(self.sink, ProgressPrinter):
            self.sink.handle(e)
        else:  # a ProgressBoard actor handle: fire and forget
            self.sink.push.remote(e)


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.events: list[dict] = []

        def push(self, event: dict) -> None:
            self.events.append(event)

        def since(self, i: int) -> list[dict]:
            return self.events[i:]

    return ProgressBoard


class DriverProgress:
    """On the driver: the board actor and the thread that prints its events."""

    def __init__(self, printer: ProgressPrinter | None = None, interval: float = 0.5) -> None:
        self.board = _board_class().remote()
        self.printer = printer or ProgressPrinter()
        self.interval = interval
        self._stop = threading.Event()
        self._n = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="avmoe-progress")

    def __enter__(self) -> "DriverProgress":
        self._thread.start()
        return self

    def _drain(self) -> None:
        import ray

        for e in ray.get(self.board.since.remote(self._n)):
            self._n += 1
            self.printer.handle(e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._drain()
            except Exception:  # the display must never fail a run
                return

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._drain()
        except Exception:
            pass
        self.printer.close_bar()
        ray.kill(self.board)
