"""Per-worker Prometheus metrics of a training rank (the metrics contract of README "Exported Prometheus metrics").

Why a prometheus-client HTTP server per worker and not ``ray.util.metrics``:
- Ray's metrics agent exports every user metric with a ``ray_`` prefix, so the ``avmoe_`` names
  the dashboard and README promise would become ``ray_avmoe_…``, and the same code run outside Ray
  (a local job, a unit test) would export nothing;
- Ray aggregates user metrics through its per-node agent (OpenCensus/OpenTelemetry), adding a
  reporting delay and a dependency on the dashboard agent being healthy; a plain /metrics
  endpoint is scraped directly and can be tested with one HTTP GET.
The price is service discovery, solved twice (cluster/monitoring/prometheus.yml, podmonitor.yaml):
- every worker writes a file-SD target (``<sd_dir>/<job>-rank<r>.json``, atomic rename) that a
  Prometheus on the same host or on a shared file system reads with ``file_sd_configs``;
- with the default port policy (first free port in ``[9460, 9460+8)``) a Prometheus on the Ray
  head derives worker targets from Ray's own ``/tmp/ray/prom_metrics_service_discovery.json`` by
  rewriting the port (one scrape job per port slot), and KubeRay's PodMonitor lists the slots as
  named container ports. No extra daemon is needed.

Configuration (arguments win over environment, environment over defaults):
- ``AVMOE_METRICS``: ``0`` disables (``start()`` returns None, every method is a no-op).
- ``AVMOE_METRICS_ADDR``: bind address. Default: the node's address (Ray's node IP): ``127.0.0.1``
  in local runs, tests and the demo (nothing is exposed off the machine), the node's own IP on a
  cluster (scraped there by the Prometheus on the head / in the Kubernetes cluster); never every
  interface unless asked for (``0.0.0.0``).
- ``AVMOE_METRICS_PORT`` (default 9460) and ``AVMOE_METRICS_PORT_SLOTS`` (default 8, one per GPU
  of an 8-GPU node): the first free port of the range is used. Port 0 = any free port.
- ``AVMOE_METRICS_SD_DIR`` (default ``/tmp/avmoe/prometheus_sd``; empty = don't write).
- ``AVMOE_METRICS_STRICT=1`` makes methods raise instead of logging (tests); by default a metrics
  problem never interrupts training.

Label conventions: every series has ``job`` (the run name), ``task``, ``rank``, ``node``. Scrape
with ``honor_labels: true`` so Prometheus keeps our ``job`` instead of renaming it
``exported_job``.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import json
import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping

from prometheus_client import (CollectorRegistry, Counter, Gauge, disable_created_metrics,
                               start_http_server)

from .flops import current_device_peak
from .gpu import NvmlCollector

log = logging.getLogger(__name__)

# The per-counter `*_created` timestamp series double the scrape size and no panel uses them
# (process-wide setting of prometheus_client; Prometheus itself ignores them by default).
disable_created_metrics()

DEFAULT_PORT = 9460
DEFAULT_PORT_SLOTS = 8
DEFAULT_SD_DIR = "/tmp/avmoe/prometheus_sd"
LABELS = ("job", "task", "rank", "node")

# name -> (type, unit/description). The single source for the README's metrics table and for the
# dashboard test; WorkerMetrics registers exactly these (GPU ones come from gpu.NvmlCollector).
METRICS: dict[str, tuple[str, str]] = {
    "avmoe_steps_total": ("counter", "optimizer steps taken"),
    "avmoe_samples_total": ("counter", "training samples consumed by this rank"),
    "avmoe_samples_per_second": ("gauge", "samples/s of this rank over the last `window` steps (step time incl. data wait)"),
    "avmoe_step_duration_seconds": ("gauge", "wall time of the last step, data wait included, s"),
    "avmoe_step_seconds_total": ("counter", "cumulative step wall time, s"),
    "avmoe_data_wait_duration_seconds": ("gauge", "time the last step was blocked waiting for its batch, s"),
    "avmoe_data_wait_seconds_total": ("counter", "cumulative time blocked on the next batch, s"),
    "avmoe_data_wait_ratio": ("gauge", "data wait / step time over the last `window` steps, 0..1"),
    "avmoe_skipped_samples_total": ("counter", "bad samples skipped by ingest (on_error=skip)"),
    "avmoe_loss": ("gauge", "training loss of the last step"),
    "avmoe_learning_rate": ("gauge", "learning rate of the last step"),
    "avmoe_grad_norm": ("gauge", "global gradient norm of the last step (before clipping)"),
    "avmoe_epoch": ("gauge", "current epoch (0-based)"),
    "avmoe_validation_metric": ("gauge", "last validation value, label `metric` (e.g. acc, miou, fscore)"),
    "avmoe_flops_per_sample": ("gauge", "FLOPs of forward+backward per sample, measured with FlopCounterMode"),
    "avmoe_model_flops_per_second": ("gauge", "achieved model FLOP/s = flops_per_sample × samples/s"),
    "avmoe_device_peak_flops": ("gauge", "bf16 dense peak FLOP/s of this rank's GPU (absent on CPU)"),
    "avmoe_mfu_ratio": ("gauge", "model FLOPs utilisation, 0..1 (absent on CPU or unknown GPU)"),
    "avmoe_router_expert_weight": ("gauge", "mean routing weight per expert, labels `adapter`, `expert`, 0..1"),
    "avmoe_router_expert_top1_ratio": ("gauge", "fraction of router decisions whose argmax is this expert, 0..1"),
    "avmoe_model_stat": ("gauge", "a task's own training statistic, label `stat` (CMG: codebook_perplexity_audio/_visual, codebook_live_codes, codebook_resets_total)"),
    "avmoe_checkpoint_save_duration_seconds": ("gauge", "wall time of the last checkpoint save, s"),
    "avmoe_checkpoint_save_seconds_total": ("counter", "cumulative checkpoint save time, s"),
    "avmoe_checkpoint_saves_total": ("counter", "checkpoints saved"),
}
GPU_METRICS: dict[str, tuple[str, str]] = {
    "avmoe_gpu_utilization_ratio": ("gauge", "NVML utilisation of this rank's GPU, 0..1 (label `gpu`)"),
    "avmoe_gpu_memory_used_bytes": ("gauge", "NVML memory used on this rank's GPU, bytes"),
    "avmoe_gpu_memory_total_bytes": ("gauge", "NVML memory of this rank's GPU, bytes"),
    "avmoe_cuda_memory_max_allocated_bytes": ("gauge", "torch allocator peak allocated, bytes"),
    "avmoe_cuda_memory_max_reserved_bytes": ("gauge", "torch allocator peak reserved, bytes"),
}


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _safe(fn):
    """Metrics must never stop training: log (once per method) instead of raising, unless strict."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            if self.strict:
                raise
            if fn.__name__ not in self._warned:
                self._warned.add(fn.__name__)
                log.warning("WorkerMetrics.%s failed (metrics only; training continues)", fn.__name__,
                            exc_info=True)
            return None

    return wrapper


def _f(x: Any) -> float:
    """float() of a number, 0-d tensor or numpy scalar (detached: no autograd warning)."""
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "item"):
        x = x.item()
    return float(x)


class WorkerMetrics:
    """Prometheus metrics of one training rank, served on its own /metrics endpoint.

    ``observe_step(samples, step_seconds, data_wait_seconds, ...)``: ``step_seconds`` is the
    wall time of the whole iteration *including* the wait for its batch (end of the previous step
    to end of this one), so ``data_wait_ratio = wait / step`` and samples/s = samples / step.
    """

    def __init__(self, job: str, task: str, rank: int, node: str | None = None,
                 bind_address: str | None = None, port: int | None = None, enabled: bool = True,
                 sd_dir: str | os.PathLike | None = None, window: int = 10,
                 strict: bool | None = None):
        self.enabled = bool(enabled) and _env_flag("AVMOE_METRICS", True)
        self.strict = _env_flag("AVMOE_METRICS_STRICT", False) if strict is None else bool(strict)
        self._warned: set[str] = set()
        self.job, self.task, self.rank = str(job), str(task), int(rank)
        self.node = str(node) if node else "127.0.0.1"
        env_addr = os.environ.get("AVMOE_METRICS_ADDR")
        self.bind_address = bind_address or env_addr or (
            "127.0.0.1" if _is_loopback(self.node) else self.node)
        if port is None:
            port = int(os.environ.get("AVMOE_METRICS_PORT", DEFAULT_PORT))
            self._port_slots = int(os.environ.get("AVMOE_METRICS_PORT_SLOTS", DEFAULT_PORT_SLOTS))
        else:
            self._port_slots = 1  # an explicit port is used as given (0 = any free port)
        self._port_base = int(port)
        sd = os.environ.get("AVMOE_METRICS_SD_DIR", DEFAULT_SD_DIR) if sd_dir is None else str(sd_dir)
        self.sd_dir = Path(sd) if sd else None
        self.sd_file: Path | None = None
        self.port: int | None = None
        self._server = None
        self._thread = None
        self._lock = threading.Lock()
        self._window: collections.deque = collections.deque(maxlen=max(1, int(window)))
        self._flops_per_sample: float | None = None
        self._skipped_seen = 0  # the running total last exported
        self._peak = current_device_peak()[1] if self.enabled else None
        self.registry = CollectorRegistry()
        self._lv = (self.job, self.task, str(self.rank), self.node)
        self._m: dict[str, Any] = {}
        if self.enabled:
            self._build()

    # ------------------------------------------------------------------ registry

    def _build(self) -> None:
        for name, (kind, doc) in METRICS.items():
            extra: tuple[str, ...] = ()
            if name == "avmoe_validation_metric":
                extra = ("metric",)
            elif name == "avmoe_model_stat":
                extra = ("stat",)
            elif name.startswith("avmoe_router_"):
                extra = ("adapter", "expert")
            if kind == "counter":
                # prometheus_client appends _total itself
                metric = Counter(name[: -len("_total")], doc, LABELS + extra, registry=self.registry)
            else:
                metric = Gauge(name, doc, LABELS + extra, registry=self.registry)
            self._m[name] = metric
        # Counters start at 0 so rate() works from the first scrape; gauges without a value yet
        # (loss before the first step, MFU on CPU) stay absent rather than reading a fake 0.
        for name, (kind, _) in METRICS.items():
            if kind == "counter":
                self._m[name].labels(*self._lv)
        if self._peak is not None:
            self._g("avmoe_device_peak_flops").set(self._peak)
        self._nvml = NvmlCollector(LABELS, self._lv)
        self.registry.register(self._nvml)

    def _g(self, name: str, *extra: str):
        return self._m[name].labels(*self._lv, *extra)

    # ------------------------------------------------------------------ lifecycle

    @_safe
    def start(self) -> int | None:
        """Start the HTTP server (and write the file-SD target); returns the bound port."""
        if self._server is not None:
            return self.port
        last_err: Exception | None = None
        for port in range(self._port_base, self._port_base + max(1, self._port_slots)):
            try:
                self._server, self._thread = start_http_server(port, addr=self.bind_address,
                                                               registry=self.registry)
                break
            except OSError as e:  # taken by another rank on this node: next slot
                last_err = e
        if self._server is None:
            raise OSError(f"no free metrics port in [{self._port_base}, "
                          f"{self._port_base + self._port_slots}) on {self.bind_address}: {last_err}")
        self.port = int(self._server.server_port)
        self._write_sd()
        log.info("avmoe metrics for %s rank %d on http://%s:%d/metrics", self.job, self.rank,
                 self.bind_address, self.port)
        return self.port

    def target(self) -> str | None:
        """host:port Prometheus should scrape (the node address when bound to all interfaces)."""
        if self.port is None:
            return None
        host = self.node if self.bind_address in ("0.0.0.0", "::") else self.bind_address
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _write_sd(self) -> None:
        if self.sd_dir is None:
            return
        try:
            self.sd_dir.mkdir(parents=True, exist_ok=True)
            safe_job = re.sub(r"[^A-Za-z0-9_.-]", "_", self.job)
            path = self.sd_dir / f"{safe_job}-rank{self.rank}.json"
            content = [{"targets": [self.target()],
                        "labels": {"avmoe_run": self.job, "avmoe_rank": str(self.rank)}}]
            tmp = path.with_suffix(f".json.tmp{os.getpid()}")
            tmp.write_text(json.dumps(content))
            os.replace(tmp, path)  # atomic: Prometheus never reads a half-written file
            self.sd_file = path
        except OSError as e:  # SD is a convenience; the endpoint still works without it
            log.warning("could not write Prometheus file-SD target to %s: %s", self.sd_dir, e)

    def close(self) -> None:
        """Stop the server and remove the SD target. Safe to call twice or when disabled."""
        if self._server is not None:
            try:
                self._server.shutdown()
                self._server.server_close()
            except Exception:
                pass
            self._server = None
        if self.sd_file is not None:
            try:
                self.sd_file.unlink()
            except OSError:
                pass
            self.sd_file = None
        nv = getattr(self, "_nvml", None)
        if nv is not None:
            nv.close()

    def __enter__(self) -> "WorkerMetrics":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ training-loop API

    @_safe
    def set_flops_per_sample(self, flops: float | None) -> None:
        if flops is None or not flops > 0:
            return
        with self._lock:
            self._flops_per_sample = float(flops)
        self._g("avmoe_flops_per_sample").set(float(flops))

    @_safe
    def observe_step(self, samples: int, step_seconds: float, data_wait_seconds: float = 0.0,
                     loss: Any = None, lr: Any = None, grad_norm: Any = None) -> None:
        samples, step_s, wait_s = int(samples), _f(step_seconds), _f(data_wait_seconds or 0.0)
        self._g("avmoe_steps_total").inc()
        self._g("avmoe_samples_total").inc(samples)
        self._g("avmoe_step_duration_seconds").set(step_s)
        self._g("avmoe_step_seconds_total").inc(max(step_s, 0.0))
        self._g("avmoe_data_wait_duration_seconds").set(wait_s)
        self._g("avmoe_data_wait_seconds_total").inc(max(wait_s, 0.0))
        with self._lock:
            self._window.append((samples, step_s, wait_s))
            n = sum(w[0] for w in self._window)
            t = sum(w[1] for w in self._window)
            wt = sum(w[2] for w in self._window)
            fps = self._flops_per_sample
        if t > 0:
            sps = n / t
            self._g("avmoe_samples_per_second").set(sps)
            self._g("avmoe_data_wait_ratio").set(min(max(wt / t, 0.0), 1.0))
            if fps is not None:
                achieved = fps * sps
                self._g("avmoe_model_flops_per_second").set(achieved)
                if self._peak:
                    self._g("avmoe_mfu_ratio").set(achieved / self._peak)
        if loss is not None:
            self._g("avmoe_loss").set(_f(loss))
        if lr is not None:
            self._g("avmoe_learning_rate").set(_f(lr))
        if grad_norm is not None:
            g = _f(grad_norm)
            self._g("avmoe_grad_norm").set(g)

    @_safe
    def set_epoch(self, epoch: int) -> None:
        self._g("avmoe_epoch").set(int(epoch))

    @_safe
    def set_validation(self, metric: str, value: Any) -> None:
        self._g("avmoe_validation_metric", str(metric)).set(_f(value))

    @_safe
    def set_skipped_total(self, total: int) -> None:
        """For callers holding a running total (``stream.skipped_total``): adds the increase."""
        if total > self._skipped_seen:
            self._g("avmoe_skipped_samples_total").inc(total - self._skipped_seen)
            self._skipped_seen = total

    @_safe
    def observe_checkpoint_save(self, seconds: float) -> None:
        s = _f(seconds)
        self._g("avmoe_checkpoint_save_duration_seconds").set(s)
        self._g("avmoe_checkpoint_save_seconds_total").inc(max(s, 0.0))
        self._g("avmoe_checkpoint_saves_total").inc()

    @_safe
    def set_model_stats(self, stats: Mapping[str, Any]) -> None:
        """The task's own statistics (``TaskAuxiliary.gauges()``), one series per ``stat``."""
        for stat, value in stats.items():
            v = _f(value)
            if not math.isnan(v):
                self._g("avmoe_model_stat", str(stat)).set(v)

    @_safe
    def set_router_usage(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """``model.router_stats()``: {adapter: {"mean_weight": (E,), "argmax_count": (E,)}}."""
        for adapter, d in stats.items():
            w = d.get("mean_weight")
            if w is not None:
                vals = w.detach().cpu().tolist() if hasattr(w, "detach") else list(w)
                for e, v in enumerate(vals):
                    if not math.isnan(v):
                        self._g("avmoe_router_expert_weight", str(adapter), str(e)).set(v)
            c = d.get("argmax_count")
            if c is not None:
                counts = c.detach().cpu().tolist() if hasattr(c, "detach") else list(c)
                total = sum(counts)
                if total > 0:
                    for e, v in enumerate(counts):
                        self._g("avmoe_router_expert_top1_ratio", str(adapter), str(e)).set(v / total)

    # ------------------------------------------------------------------ introspection

    @property
    def peak_flops(self) -> float | None:
        return self._peak
