"""Training telemetry: per-worker Prometheus metrics, FLOPs per sample and MFU.

    from avmoe.telemetry import WorkerMetrics, flops_per_sample
    m = WorkerMetrics(job="ave-run1", task="ave", rank=0, node=node_ip)
    m.start()
    m.set_flops_per_sample(flops_per_sample(model, loss_fn, batch))
    m.observe_step(samples=B, step_seconds=s, data_wait_seconds=w, loss=l, lr=lr, grad_norm=g)
    ...
    m.close()

See worker.py for the design (why prometheus-client per worker, service discovery, defaults).
"""

from .flops import PEAK_BF16_FLOPS, current_device_peak, flops_per_sample, peak_flops_for
from .worker import GPU_METRICS, METRICS, WorkerMetrics

__all__ = ["WorkerMetrics", "flops_per_sample", "peak_flops_for", "current_device_peak",
           "PEAK_BF16_FLOPS", "METRICS", "GPU_METRICS"]
