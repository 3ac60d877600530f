"""Per-rank GPU gauges read from NVML at scrape time (nvidia-ml-py).

Ray already exports node-level ``ray_node_gpus_utilization`` / ``ray_node_gram_used`` per GPU
index; what it cannot say is which GPU a training *rank* runs on. These gauges carry the rank's
labels (job, task, rank, node) plus ``gpu`` (the NVML index) so the dashboard can put a rank's
utilisation beside its MFU. The torch allocator peaks (``max_memory_allocated/reserved``, as in
torchtitan) are not visible to NVML or Ray at all. On a machine without NVML or CUDA the
collector yields nothing: the series are absent, and nothing raises.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

GPU_UTIL = "avmoe_gpu_utilization_ratio"
GPU_MEM_USED = "avmoe_gpu_memory_used_bytes"
GPU_MEM_TOTAL = "avmoe_gpu_memory_total_bytes"
CUDA_MAX_ALLOC = "avmoe_cuda_memory_max_allocated_bytes"
CUDA_MAX_RESERVED = "avmoe_cuda_memory_max_reserved_bytes"
GPU_METRIC_NAMES = (GPU_UTIL, GPU_MEM_USED, GPU_MEM_TOTAL, CUDA_MAX_ALLOC, CUDA_MAX_RESERVED)


def _torch_device():
    """(torch device index, NVML handle lookup key) for this process, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        idx = torch.cuda.current_device()
        uuid = None
        try:
            uuid = str(torch.cuda.get_device_properties(idx).uuid)
        except Exception:  # older torch / odd builds: fall back to CUDA_VISIBLE_DEVICES
            pass
        return idx, uuid
    except Exception:
        return None


class NvmlCollector(Collector):
    """Yields GPU gauges for the device this process uses; nothing when NVML is unusable."""

    def __init__(self, label_names: Sequence[str], label_values: Sequence[str]):
        self._names = list(label_names)
        self._values = list(label_values)
        self._lock = threading.Lock()
        self._handle = None
        self._nvml_index: str | None = None
        self._torch_index: int | None = None
        self._unavailable = False
        self._pynvml = None

    def _init(self) -> bool:
        if self._handle is not None:
            return True
        if self._unavailable:
            return False
        dev = _torch_device()
        if dev is None:
            self._unavailable = True  # CPU rank: no GPU series at all
            return False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._pynvml = pynvml
            self._torch_index, uuid = dev
            handle = None
            if uuid:
                u = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(u)
                except pynvml.NVMLError:
                    handle = None
            if handle is None:
                visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
                phys = visible[self._torch_index] if self._torch_index < len(visible) else str(self._torch_index)
                handle = (pynvml.nvmlDeviceGetHandleByUUID(phys) if phys.startswith("GPU-")
                          else pynvml.nvmlDeviceGetHandleByIndex(int(phys)))
            self._handle = handle
            self._nvml_index = str(pynvml.nvmlDeviceGetIndex(handle))
            return True
        except Exception as e:  # NVMLError_LibraryNotFound on CPU-only hosts, etc.
            log.info("NVML unavailable, GPU gauges absent: %s", e)
            self._unavailable = True
            return False

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            if not self._init():
                return []
            names = self._names + ["gpu"]
            values = self._values + [self._nvml_index]
            out = []
            try:
                nv = self._pynvml
                util = nv.nvmlDeviceGetUtilizationRates(self._handle)
                mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
                g = GaugeMetricFamily(GPU_UTIL, "GPU busy fraction (NVML utilization.gpu / 100) of this rank's device", labels=names)
                g.add_metric(values, util.gpu / 100.0)
                out.append(g)
                g = GaugeMetricFamily(GPU_MEM_USED, "GPU memory in use on this rank's device (NVML), bytes", labels=names)
                g.add_metric(values, float(mem.used))
                out.append(g)
                g = GaugeMetricFamily(GPU_MEM_TOTAL, "GPU memory of this rank's device (NVML), bytes", labels=names)
                g.add_metric(values, float(mem.total))
                out.append(g)
            except Exception as e:
                log.warning("NVML query failed: %s", e)
            try:
                import torch

                if torch.cuda.is_initialized():
                    g = GaugeMetricFamily(CUDA_MAX_ALLOC, "peak bytes allocated by the torch CUDA allocator on this rank", labels=names)
                    g.add_metric(values, float(torch.cuda.max_memory_allocated(self._torch_index)))
                    out.append(g)
                    g = GaugeMetricFamily(CUDA_MAX_RESERVED, "peak bytes reserved by the torch CUDA allocator on this rank", labels=names)
                    g.add_metric(values, float(torch.cuda.max_memory_reserved(self._torch_index)))
                    out.append(g)
            except Exception as e:
                log.warning("torch.cuda memory stats failed: %s", e)
            return out

    def close(self) -> None:
        with self._lock:
            if self._handle is not None and self._pynvml is not None:
                try:
                    self._pynvml.nvmlShutdown()
                except Exception:
                    pass
            self._handle = None
