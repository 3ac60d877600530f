"""The embedded default's data: generate (or reuse) a synthetic dataset for a task, pack
every split, verify the shards. Used by the job specs when they run with no ``--data``, and
by ``make demo``, which also inspects the shards and then trains: ``jobs/ave.py`` with no
arguments (embedded Ray, tiny preset, 2 CPU workers; it prints the metrics).

``python -m data_pipeline.demo [--task ave] [--out data/demo]``
"""

from __future__ import annotations

import argparse
import os
import time

from data_pipeline import storage
from data_pipeline.datasets import get_dataset, list_datasets
from data_pipeline.pack import PackOptions, pack
from data_pipeline.synth import synth
from data_pipeline.verify import verify


def prepare_demo_shards(dataset: str = "ave", root: str = "data/demo", n: int | None = None,
                        frame_size: int = 64, workers: int = 2, seed: int = 0,
                        log=print) -> str:
    """Shards of every split of a synthetic ``dataset`` (``n`` training videos, default its
    ``demo_size``) under ``root`` (a local directory or any fsspec URL: the raw files are then
    generated in a local cache); returns the shard directory (URL). Re-running reuses what is
    there (packing is idempotent)."""
    ds = get_dataset(dataset)
    local_root = root if storage.is_local(root) else os.path.join(storage.cache_dir(), "demo-raw")
    raw = os.path.join(storage.local_path(local_root), dataset, "raw")
    shards = storage.join(root, f"{dataset}/shards") if not storage.is_local(root) else os.path.join(
        storage.local_path(root), dataset, "shards")
    done = os.path.join(raw, ".complete")
    if not os.path.exists(done):
        t0 = time.perf_counter()
        synth(dataset, n or ds.demo_size, raw, seed=seed)
        open(done, "w").close()
        log(f"[demo] generated synthetic {dataset} data in {raw} "
            f"({time.perf_counter() - t0:.1f} s)")
    opts = PackOptions(frame_size=frame_size, mask_size=frame_size, shard_bytes=8 * 2**20)
    for split in ds.splits:
        t0 = time.perf_counter()
        res = pack(ds, raw, split, shards, opts, workers=workers, progress=False)
        m = res.manifest
        log(f"[demo] {split}: {m['num_samples']} samples in {m['num_shards']} shards "
            f"({m['total_bytes'] / 1e6:.1f} MB) at {shards} "
            f"({'packed' if res.encoded else 'reused'}, {time.perf_counter() - t0:.1f} s)")
    rep = verify(shards)
    log(f"[demo] verified {rep.shards} shards: " +
        ", ".join(f"{k}={v}" for k, v in rep.splits.items()))
    return shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="ave", choices=list_datasets())
    p.add_argument("--out", default="data/demo")
    p.add_argument("--png", default=None, help="also render one sample (default <out>/<task>/sample.png)")
    args = p.parse_args(argv)
    shards = prepare_demo_shards(args.task, args.out)
    from data_pipeline.inspect_shards import render_png, summary

    print(summary(shards))
    png = args.png or os.path.join(args.out, args.task, "sample.png")
    render_png(shards, png)
    print(f"[demo] rendered one sample to {png}")
    print("[demo] shards ready; `make demo` now trains on them with jobs/ave.py (no arguments)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
