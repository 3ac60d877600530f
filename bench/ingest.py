"""Streaming-ingest throughput against an upstream-style loader and the bare decode limit.

Data: a synthetic AVE dataset in the official raw layout (12 JPEG frames of 224x224 per video,
10 of them used, and a 10-s float32 wave .npy), packed once at ``--frame-size 224`` (10 JPEG
frames + 10 s int16 audio per sample, ~0.85 MB). The 10x dataset is the 1x shards replicated
under new keys (tar members re-written, nothing re-encoded), with its own manifest.

In one run, samples/s per CPU core (median of ``--repeats``) for
  1. upstream-style: torch DataLoader over the raw layout, ``num_workers`` = cores, each sample
     PIL decode + bicubic resize to 192 + ToTensor/Normalize (float32), wave .npy -> float
     tensor -- what the official AVMoE loaders do;
  2. bare decode limit: one core, a tight loop decoding the same 10 JPEGs per sample (from the
     shards) + loading the int16 audio; Pillow, simplejpeg and torchvision.io.decode_jpeg are
     each measured and the fastest is the limit;
  3. our ingest: ``ShardStream`` (Ray Data with ``num_cpus`` = cores) to ``AVBatch`` on the
     consumer, over the 10x dataset (so per-epoch start-up is amortised as in training);
and the peak RSS of a fresh consuming process (Ray driver + ``ShardStream``) streaming one
epoch of the 1x and of the 10x dataset.

    scripts/loopback .venv/bin/python bench/ingest.py [--n 128] [--scale 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ------------------------------------------------------------------------------ data
def make_data(root: str, n: int, scale: int) -> tuple[str, str, str]:
    from data_pipeline.pack import PackOptions, pack
    from data_pipeline.synth import synth

    raw, one, ten = (os.path.join(root, d) for d in ("raw", "shards-1x", "shards-10x"))
    synth("ave", n, raw, seed=0, size=224)
    # ~32 samples per shard: enough shards to permute, like 256-MB shards of a real split
    pack("ave", raw, "train", one, PackOptions(frame_size=224, shard_samples=32), workers=2,
         progress=False)
    replicate(one, ten, scale)
    return raw, one, ten


def replicate(src: str, dst: str, scale: int) -> None:
    """``scale`` copies of every shard under new keys (``<key>-cK``), with a manifest."""
    from data_pipeline.tario import DeterministicTarWriter, iter_tar_samples

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "train.manifest.json")) as f:
        m = json.load(f)
    shards = []
    for c in range(scale):
        for e in m["shards"]:
            name = f"train-{len(shards):06d}.tar"
            with open(os.path.join(src, e["name"]), "rb") as f:
                samples = list(iter_tar_samples(f, e["name"]))
            with open(os.path.join(dst, name), "wb") as f:
                w = DeterministicTarWriter(f)
                keys, spans, shas = [], [], []
                for key, members in samples:
                    k = f"{key}-c{c}"
                    off, length, sha = w.add_sample(k, list(members.items()))
                    keys.append(k)
                    spans.append([off, length])
                    shas.append(sha)
                nbytes, sha = w.close()
            shards.append({"name": name, "samples": len(keys), "bytes": nbytes, "sha256": sha,
                           "keys": keys, "spans": spans, "sample_sha256": shas})
    m.update(shards=shards, num_shards=len(shards), num_samples=sum(s["samples"] for s in shards),
             total_bytes=sum(s["bytes"] for s in shards), fingerprint=f"replicated-{scale}x")
    with open(os.path.join(dst, "train.manifest.json"), "w") as f:
        json.dump(m, f)


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants (DataLoader workers; the Ray
    processes, which ``init_local_ray`` starts as children). On a shared machine this, not
    wall time x cores, is what a run actually got."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# ------------------------------------------------------------------------------ (1) upstream
class UpstreamAVE:
    """The official AVE loader's per-sample work: 10 of the frame files (linspace rule), PIL
    decode, bicubic resize to 192, ToTensor + ImageNet Normalize; wave .npy as float."""

    def __init__(self, raw: str):
        self.videos = sorted(os.listdir(os.path.join(raw, "frames")))
        self.raw = raw
        import torchvision.transforms as T

        self.tf = T.Compose([T.Resize((192, 192), interpolation=T.InterpolationMode.BICUBIC),
                             T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        vid = self.videos[i]
        files = sorted(glob.glob(os.path.join(self.raw, "frames", vid, "*.jpg")))
        pick = np.linspace(1, len(files), 10).astype(int) - 1
        frames = torch.stack([self.tf(Image.open(files[j]).convert("RGB")) for j in pick])
        wave = torch.from_numpy(np.load(os.path.join(self.raw, "wave", vid + ".npy"))).float()
        return frames, wave


def bench_upstream(raw: str, cores: int, repeats: int) -> list[float]:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    ds = UpstreamAVE(raw)
    dl = DataLoader(ds, batch_size=8, num_workers=cores, persistent_workers=True, shuffle=True)
    for _ in dl:  # warm-up pass: workers started, page cache warm
        pass
    rates, per_cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = sum(b[0].shape[0] for b in dl)
        rates.append(n / (time.perf_counter() - t0) / cores)
        per_cpu.append(n / (cpu_seconds() - c0))
    del dl
    return rates, per_cpu


# ------------------------------------------------------------------------------ (2) decode
def shard_members(url: str, limit: int) -> list[tuple[list[bytes], bytes]]:
    from data_pipeline.tario import iter_tar_samples

    with open(os.path.join(url, "train.manifest.json")) as f:
        m = json.load(f)
    out = []
    for e in m["shards"]:
        with open(os.path.join(url, e["name"]), "rb") as f:
            for _, mem in iter_tar_samples(f, e["name"]):
                out.append(([mem[f"f{t:02d}.jpg"] for t in range(10)], mem["audio.npy"]))
                if len(out) >= limit:
                    return out
    return out


def bench_decoders(samples, repeats: int, seconds: float = 1.5) -> dict[str, list[float]]:
    import simplejpeg
    import torch
    import torchvision.io as tvio
    from PIL import Image

    torch.set_num_threads(1)

    def pil(b):
        return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    def sj(b):
        return simplejpeg.decode_jpeg(b, colorspace="RGB")

    def tv(b):
        return tvio.decode_jpeg(torch.frombuffer(b, dtype=torch.uint8)).permute(1, 2, 0)

    out = {}
    for name, fn in (("Pillow", pil), ("simplejpeg", sj), ("torchvision.io", tv)):
        rates, per_cpu = [], []
        for _ in range(repeats):
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                frames, audio = samples[n % len(samples)]
                for b in frames:
                    fn(b)
                np.load(io.BytesIO(audio), allow_pickle=False)
                n += 1
            rates.append(n / (time.perf_counter() - t0))
            per_cpu.append(n / (time.process_time() - c0))
        out[name] = (rates, per_cpu)
    return out


# ------------------------------------------------------------------------------ (3) ingest
def ingest_cfg(url: str, **kw):
    from data_pipeline.ingest import IngestConfig

    kw.setdefault("batch_size", 8)
    kw.setdefault("shuffle_buffer", 64)
    kw.setdefault("prefetch_batches", 4)
    return IngestConfig(url=url, **kw)


def bench_ingest(url: str, cores: int, repeats: int) -> list[float]:
    from data_pipeline.ingest import ShardStream

    s = ShardStream(ingest_cfg(url))
    rates, per_cpu = [], []
    for e in range(repeats + 1):
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = 0
        for b in s.epoch(e):
            n += b.batch_size
        if e:  # epoch 0 warms workers and the page cache
            rates.append(n / (time.perf_counter() - t0) / cores)
            per_cpu.append(n / (cpu_seconds() - c0))
    return rates, per_cpu


def rss_child(url: str, cores: int, epochs: int = 1) -> None:
    """Runs in a fresh process: ``epochs`` epochs, sampling this process's memory every 20 ms; prints
    the peaks in MiB of RSS and of RSS minus shared pages. RSS also counts the pages of Ray's
    shared-memory object store that the consumer has mapped (zero-copy reads of blocks); the
    store's allocator cycles through its arena, so that part grows with the data streamed
    until it reaches the store's size. The object store is capped at 1 GiB here so that the
    bound is the configuration, as it should be on a training node."""
    import threading

    import psutil

    from avmoe.ray_env import init_local_ray

    init_local_ray(num_cpus=cores, object_store_memory=1 << 30)
    from data_pipeline.ingest import ShardStream

    me, peak, stop = psutil.Process(), {"rss": 0, "uss": 0}, threading.Event()

    def poll():
        while not stop.is_set():
            m = me.memory_info()
            peak["rss"] = max(peak["rss"], m.rss)
            peak["uss"] = max(peak["uss"], m.rss - m.shared)
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    s = ShardStream(ingest_cfg(url))
    n = sum(b.batch_size for e in range(epochs) for b in s.epoch(e))
    stop.set()
    t.join()
    print(json.dumps({"samples": n, "peak_rss_mib": peak["rss"] / 2**20,
                      "peak_private_mib": peak["uss"] / 2**20}))


def peak_rss(url: str, cores: int, epochs: int = 1) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", url,
                           "--cores", str(cores), "--rss-epochs", str(epochs)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="videos in the 1x dataset")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--keep", help="reuse/keep data in this directory")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--rss-epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.cores, args.rss_epochs)

    root = args.keep or tempfile.mkdtemp(prefix="bench-ingest-")
    try:
        t0 = time.time()
        if os.path.exists(os.path.join(root, "shards-10x", "train.manifest.json")):
            raw, one, ten = (os.path.join(root, d) for d in ("raw", "shards-1x", "shards-10x"))
        else:
            raw, one, ten = make_data(root, args.n, args.scale)
        with open(os.path.join(one, "train.manifest.json")) as f:
            m1 = json.load(f)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}; {m1['num_samples']} samples "
              f"({m1['total_bytes'] / m1['num_samples'] / 1e6:.2f} MB each) x1 and x{args.scale}; "
              f"data ready in {time.time() - t0:.0f} s", flush=True)

        med = statistics.median

        def show(label, res):
            wall, cpu = res
            print(f"{label}: {med(wall):.1f} samples/s/core wall ({' '.join(f'{r:.1f}' for r in wall)}); "
                  f"{med(cpu):.1f} samples/CPU-s ({' '.join(f'{r:.1f}' for r in cpu)}); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)

        up = bench_upstream(raw, args.cores, args.repeats)
        show("(1) upstream-style DataLoader", up)
        dec = bench_decoders(shard_members(one, 64), args.repeats)
        for name, r in dec.items():
            show(f"(2) bare decode, {name:>14}", r)
        best = max(dec, key=lambda k: med(dec[k][1]))

        from avmoe.ray_env import init_local_ray

        init_local_ray(num_cpus=args.cores)
        ours = bench_ingest(ten, args.cores, args.repeats)
        show("(3) ShardStream -> AVBatch", ours)
        import ray

        ray.shutdown()
        r1, r10 = peak_rss(one, args.cores), peak_rss(ten, args.cores)
        # the 10x set streamed 3 times: what the consumer holds must not grow with data streamed
        r30 = peak_rss(ten, args.cores, epochs=3)
        growth = r10["peak_rss_mib"] / r1["peak_rss_mib"] - 1
        print()
        print("| measure | samples/s per core (wall) | samples per CPU-second | target | met (CPU-s / wall) |")
        print("|---|---|---|---|---|")
        print(f"| (1) upstream-style loader | {med(up[0]):.1f} | {med(up[1]):.1f} | | |")
        for name, r in dec.items():
            print(f"| (2) bare decode, {name} | {med(r[0]):.1f} | {med(r[1]):.1f} | | |")
        print(f"| (3) our ingest end to end | {med(ours[0]):.1f} | {med(ours[1]):.1f} | | |")
        for label, a, b, target in (("(3)/(1)", ours, up, 3.0),
                                    (f"(3)/(2) ({best})", ours, dec[best], 0.8)):
            rw, rc = med(a[0]) / med(b[0]), med(a[1]) / med(b[1])
            print(f"| {label} | {rw:.2f}x | {rc:.2f}x | >= {target}x | "
                  f"{'yes' if rc >= target else 'no'} / {'yes' if rw >= target else 'no'} |")
        ug = r10["peak_private_mib"] / r1["peak_private_mib"] - 1
        for label, r in (("1x", r1), (f"{args.scale}x", r10), (f"{args.scale}x, 3 epochs", r30)):
            print(f"| peak RSS / RSS-minus-shared of the consumer, {label} ({r['samples']} samples) | "
                  f"{r['peak_rss_mib']:.0f} / {r['peak_private_mib']:.0f} MiB | | | |")
        print(f"| growth 1x -> {args.scale}x (RSS / RSS-minus-shared) | {growth:+.1%} / {ug:+.1%} | | "
              f"<= +10 % | {'yes' if growth <= 0.10 else 'no'} / {'yes' if ug <= 0.10 else 'no'} |")
        g3 = r30["peak_rss_mib"] / r10["peak_rss_mib"] - 1
        u3 = r30["peak_private_mib"] / r10["peak_private_mib"] - 1
        print(f"| growth {args.scale}x -> {args.scale}x streamed 3 times (RSS / RSS-minus-shared) | "
              f"{g3:+.1%} / {u3:+.1%} | | | |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
