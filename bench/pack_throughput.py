"""Packing throughput of ``data_pipeline pack`` for --workers 1 and 2, in one run.

Input: a synthetic AVE dataset in the official raw layout, 224x224 JPEG frames (12 per video)
and 10-s float32 waves; output at the default --frame-size 192 (decode + resize + JPEG encode
per frame, float -> int16 audio). Prints the median of --repeats runs per worker count.

    .venv/bin/python bench/pack_throughput.py [--n 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

from data_pipeline.pack import PackOptions, pack
from data_pipeline.synth import synth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-pack-")
    try:
        raw = os.path.join(root, "raw")
        synth("ave", args.n, raw, seed=0, size=224)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"{args.n} AVE videos (224x224 frames -> 192, 10 s audio)")
        print(f"{'workers':>8} {'samples/s':>10} {'MB/s out':>9} {'MB/s in':>8}  runs(s)")
        in_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(raw) for f in fs)
        for w in args.workers:
            times, out_bytes = [], 0
            for r in range(args.repeats):
                out = os.path.join(root, f"out-{w}-{r}")
                t0 = time.perf_counter()
                res = pack("ave", raw, "train", out, PackOptions(), workers=w, progress=False)
                times.append(time.perf_counter() - t0)
                out_bytes = res.manifest["total_bytes"]
                shutil.rmtree(out)
            med = statistics.median(times)
            print(f"{w:>8} {args.n / med:>10.1f} {out_bytes / med / 1e6:>9.1f} "
                  f"{in_bytes * args.n / (args.n + 2 * max(2, args.n // 4)) / med / 1e6:>8.1f}  "
                  + " ".join(f"{t:.2f}" for t in times))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
