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

Decode placement (``--decode-on ingest,trainer``, the default; ``IngestConfig.decode_on``: JPEG
frames decoded in the Ray Data tasks, or shipped as bytes and decoded by a thread pool in the
consumer): per placement, and for ``--before DIR`` (an earlier checkout's ``data_pipeline``),
``--repeats`` fresh consuming processes, interleaved, each streaming the 10x dataset 3 times:
time to the first batch of epoch 0 (``epoch()`` called right after the ``ShardStream`` is made;
Ray up and idle for 5 s, torch imported), the same 3 s after the stream is made (what a trainer
spends building its model and DeepSpeed engine in between; a fresh process on the 1x set), and
of epoch 1; samples/s, samples per CPU-second of the whole
process tree (Ray's daemons and workers are the consumer's children) and of the consumer alone,
over epochs 1-2; the consumer's peak RSS; and the bytes per sample each placement moves through
the object store. ``--no-baselines`` runs only this part.

    scripts/loopback .venv/bin/python bench/ingest.py [--n 128] [--scale 10] [--repeats 3]
        [--decode-on ingest,trainer] [--before DIR] [--no-baselines] [--keep DIR]
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
# --before DIR: a fresh consuming process runs DIR's data_pipeline (an earlier checkout)
sys.path.insert(0, os.environ.get("BENCH_INGEST_CODE") or REPO)


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

    if kw.get("decode_on") is None:
        kw.pop("decode_on", None)
    kw.setdefault("batch_size", 8)
    kw.setdefault("shuffle_buffer", 64)
    kw.setdefault("prefetch_batches", 4)
    return IngestConfig(url=url, **kw)


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def bench_ingest(url: str, cores: int, repeats: int, modes=(None,)) -> dict:
    """Per decode placement: (samples/s/core, samples per CPU-second of the process tree,
    samples per CPU-second of the consuming process alone); repeats interleaved across the
    placements so that the machine's drift hits them alike."""
    from data_pipeline.ingest import ShardStream

    streams = {m: ShardStream(ingest_cfg(url, decode_on=m)) for m in modes}
    out = {m: ([], [], []) for m in modes}
    for e in range(repeats + 1):
        for m, s in streams.items():
            t0, c0, o0 = time.perf_counter(), cpu_seconds(), own_cpu_seconds()
            n = 0
            for b in s.epoch(e):
                n += b.batch_size
            if e:  # epoch 0 warms workers and the page cache
                out[m][0].append(n / (time.perf_counter() - t0) / cores)
                out[m][1].append(n / (cpu_seconds() - c0))
                out[m][2].append(n / (own_cpu_seconds() - o0))
    return out


def byte_ratio(url: str) -> dict:
    """Bytes per sample through the object store: decoded (decode_on="ingest") and as JPEG
    (decode_on="trainer"), from the shards' own members and the decode task's columns."""
    from data_pipeline.datasets import get_dataset
    from data_pipeline.manifest import load_manifest
    from data_pipeline.sample import FRAMES, SampleSpec, empty_columns
    from data_pipeline.tario import iter_tar_samples

    m = load_manifest(url, "train")
    ds = get_dataset(m["dataset"])
    spec = SampleSpec.from_manifest(m, ds)
    jpeg, n = 0, 0
    for e in m["shards"]:
        with open(os.path.join(url, e["name"]), "rb") as f:
            for _, mem in iter_tar_samples(f, e["name"]):
                jpeg += sum(len(v) for k, v in mem.items() if k.endswith(".jpg"))
                n += 1
    jpeg /= n
    dec = empty_columns(spec, 1, ds)
    raw = empty_columns(spec, 1, ds, frames=False)
    frames = dec[FRAMES].nbytes
    return {"jpeg_frames": jpeg, "decoded_frames": frames,
            "ingest_sample": sum(v.nbytes for v in dec.values()),
            "trainer_sample": sum(v.nbytes for v in raw.values()) + jpeg}


def rss_child(url: str, cores: int, epochs: int = 1, decode_on: str | None = None,
              gap: float = 0.0) -> None:
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
    # Ray up and idle (its prestarted workers booted), as under a trainer, whose own workers
    # take longer than that to start
    time.sleep(5)
    from data_pipeline.ingest import ShardStream

    me, peak, stop = psutil.Process(), {"rss": 0, "uss": 0}, threading.Event()

    def poll():
        while not stop.is_set():
            m = me.memory_info()
            peak["rss"] = max(peak["rss"], m.rss)
            peak["uss"] = max(peak["uss"], m.rss - m.shared)
            time.sleep(0.02)

    import torch  # noqa: F401  (a trainer has it imported before its first batch)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    s = ShardStream(ingest_cfg(url, decode_on=decode_on))
    time.sleep(gap)  # what a trainer does between making its stream and its first epoch
    n, first, epoch_stats = 0, [], []
    for e in range(epochs):
        t0, c0, o0, n0 = time.perf_counter(), cpu_seconds(), own_cpu_seconds(), n
        for i, b in enumerate(s.epoch(e)):
            if i == 0:  # epoch 0: right after the stream is made (a cold start)
                first.append(time.perf_counter() - t0)
            n += b.batch_size
        # samples, wall s, CPU s of the process tree (Ray's daemons and workers included), of
        # this consuming process alone
        epoch_stats.append((n - n0, time.perf_counter() - t0, cpu_seconds() - c0,
                            own_cpu_seconds() - o0))
    stop.set()
    t.join()
    print(json.dumps({"samples": n, "peak_rss_mib": peak["rss"] / 2**20,
                      "peak_private_mib": peak["uss"] / 2**20, "first_batch_s": first,
                      "epochs": epoch_stats}))


def peak_rss(url: str, cores: int, epochs: int = 1, decode_on: str | None = None,
             code: str | None = None, gap: float = 0.0) -> dict:
    env = dict(os.environ)
    if code:  # an earlier checkout's data_pipeline, in this process and its Ray workers
        env["BENCH_INGEST_CODE"] = env["PYTHONPATH"] = os.path.abspath(code)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", url,
                           "--cores", str(cores), "--rss-epochs", str(epochs),
                           "--child-gap", str(gap)]
                          + (["--child-decode-on", decode_on] if decode_on else []),
                          capture_output=True, text=True, cwd=REPO, env=env)
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
    p.add_argument("--decode-on", default="ingest,trainer",
                   help="decode placements to measure, comma-separated (ingest, trainer, gpu, auto)")
    p.add_argument("--before", metavar="DIR",
                   help="also measure an earlier checkout's ingest (its data_pipeline) in the "
                        "fresh-process runs, e.g. from git worktree add DIR <commit>")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the upstream loader, the bare decode loop and the 1x/10x memory runs")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--rss-epochs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-decode-on", help=argparse.SUPPRESS)
    p.add_argument("--child-gap", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.cores, args.rss_epochs, args.child_decode_on,
                         args.child_gap)
    modes = [m.strip() for m in args.decode_on.split(",") if m.strip()]

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
            wall, cpu = res[:2]
            print(f"{label}: {med(wall):.1f} samples/s/core wall ({' '.join(f'{r:.1f}' for r in wall)}); "
                  f"{med(cpu):.1f} samples/CPU-s ({' '.join(f'{r:.1f}' for r in cpu)}); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)

        if not args.no_baselines:
            up = bench_upstream(raw, args.cores, args.repeats)
            show("(1) upstream-style DataLoader", up)
            dec = bench_decoders(shard_members(one, 64), args.repeats)
            for name, r in dec.items():
                show(f"(2) bare decode, {name:>14}", r)
            best = max(dec, key=lambda k: med(dec[k][1]))

        # per placement (and --before), in fresh consuming processes, interleaved: 3 epochs of
        # the 10x set; first batch of epochs 0 (cold) and 1; rate and CPU over epochs 1-2
        variants = ([("before", None, args.before)] if args.before else []) + \
            [(m, m, None) for m in modes]
        fresh = {v[0]: [] for v in variants}
        gapped = {v[0]: [] for v in variants}  # epoch 0 of the 1x set, 3 s after the stream is made
        for _ in range(args.repeats):
            for label, m, code in variants:
                fresh[label].append(peak_rss(ten, args.cores, epochs=3, decode_on=m, code=code))
                gapped[label].append(peak_rss(one, args.cores, epochs=1, decode_on=m, code=code,
                                              gap=3.0)["first_batch_s"][0])
                r = fresh[label][-1]
                print(f"  {label}: first batch {r['first_batch_s'][0]:.2f} / "
                      f"{gapped[label][-1]:.2f} (3 s gap) / {r['first_batch_s'][1]:.2f} s, epochs "
                      f"{r['epochs']}, load {os.getloadavg()[0]:.1f}", flush=True)
        ratio = byte_ratio(one)
        print()
        print(f"bytes per sample through the object store: JPEG frames {ratio['jpeg_frames'] / 1e3:.0f} kB, "
              f"decoded frames {ratio['decoded_frames'] / 1e3:.0f} kB "
              f"({ratio['decoded_frames'] / ratio['jpeg_frames']:.1f}x); whole sample: "
              f"decode_on=ingest {ratio['ingest_sample'] / 1e3:.0f} kB, decode_on=trainer "
              f"{ratio['trainer_sample'] / 1e3:.0f} kB "
              f"({ratio['ingest_sample'] / ratio['trainer_sample']:.2f}x)")
        print()
        print("| decode_on | samples/s (wall) | samples per CPU-second (all processes) | "
              "samples per CPU-second of the consumer | first batch, epoch 0 (s) | same, 3 s after "
              "the stream is made (s) | first batch, epoch 1 (s) | consumer peak RSS / "
              "RSS-minus-shared (MiB) |")
        print("|---|---|---|---|---|---|---|---|")

        def runs(v, fmt="{:.2f}"):
            return " (" + " ".join(fmt.format(x) for x in v) + ")"

        for label, _, _ in variants:
            rs = fresh[label]
            w = [sum(e[0] for e in r["epochs"][1:]) / sum(e[1] for e in r["epochs"][1:]) for r in rs]
            c = [sum(e[0] for e in r["epochs"][1:]) / sum(e[2] for e in r["epochs"][1:]) for r in rs]
            o = [sum(e[0] for e in r["epochs"][1:]) / sum(e[3] for e in r["epochs"][1:]) for r in rs]
            f0 = [r["first_batch_s"][0] for r in rs]
            fg = gapped[label]
            f1 = [r["first_batch_s"][1] for r in rs]
            rss = [r["peak_rss_mib"] for r in rs]
            uss = [r["peak_private_mib"] for r in rs]
            print(f"| {label} | {med(w):.1f}{runs(w, '{:.0f}')} | {med(c):.1f}{runs(c, '{:.0f}')} | "
                  f"{med(o):.1f}{runs(o, '{:.0f}')} | {med(f0):.2f}{runs(f0)} | "
                  f"{med(fg):.2f}{runs(fg)} | {med(f1):.2f}{runs(f1)} | {med(rss):.0f} / {med(uss):.0f}{runs(rss, '{:.0f}')} |")
        if args.no_baselines:
            return
        from avmoe.ray_env import init_local_ray

        init_local_ray(num_cpus=args.cores)
        ours = bench_ingest(ten, args.cores, args.repeats, [None])[None]
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
