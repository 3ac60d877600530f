"""Our ingest against its peers on the same shards (results in bench/README.md, "Peers").

Data: ``bench/ingest.py``'s AVE-like shards (synthetic AVE packed at ``--frame-size 224``: 10 JPEG
frames of 224x224 + 10 s of int16 audio per sample, ~0.85 MB, 32 samples per shard), the 1x set
replicated ``--scale`` times under new keys; the same samples converted once to MosaicML's MDS
(JPEG bytes and the audio ``.npy`` as ``bytes`` columns, nothing re-encoded).

Loaders, batch ``--batch`` (8), each in a fresh consumer process:
  ours            ``data_pipeline.ingest.ShardStream`` -> ``AVBatch`` (Ray Data decode tasks,
                  the trainer's defaults: shuffle_buffer 256, prefetch_batches 2, the
                  ingest's default ``decode_on`` unless ``--decode-on`` says otherwise; the
                  row's label names the resolved one), Ray started by
                  ``init_local_ray(num_cpus=cores)``
  wds-simplejpeg  ``webdataset.WebDataset`` + ``torch.utils.data.DataLoader(num_workers=cores,
                  persistent_workers=True)``, frames decoded with simplejpeg in the workers
  wds-pil         the same with webdataset's own decoder (``.decode("rgb8")``: PIL)
  mosaic          MosaicML ``StreamingDataset`` over the MDS copy (local, no remote) + the same
                  DataLoader, simplejpeg (skipped when ``streaming`` is not installed:
                  ``pip install --no-deps -r bench/requirements.txt``)
  raydata         naive Ray Data: ``ray.data.read_webdataset(decoder=None)`` +
                  ``map_batches(simplejpeg decode, batch_size=8)`` + ``iter_batches(8)``
  bare            one process, no Ray, no workers: reads the shards in order (the project's tar
                  parser) and decodes with simplejpeg straight into the batch array -- the
                  decode limit of one core

Each consumer streams one untimed epoch (its time to first batch is reported as "cold": Ray
already started, Ray Data / DataLoader workers not yet), then one timed epoch. Per loader:
wall samples/s of the timed epoch; samples per CPU-second of the timed epoch over the whole
process tree; time to first batch after the iterator is created (cold and warm); peak RSS of
the consumer (VmHWM, its whole life) and the peak over both epochs of the tree's summed PSS
(proportional set size: shared pages such as Ray's object store counted once, split among the
processes mapping them). Repeats are interleaved (every loader once per repeat, the order
rotated each repeat); figures are medians with min-max.

Process-tree accounting (done by this parent process, which is not itself counted): the tree
is the consumer process and its descendants (DataLoader workers; with the embedded Ray of
``init_local_ray`` also GCS, raylet, Ray workers, agents and avmoe's Ray guard), plus, for the
Ray loaders, every process whose command line names the consumer's Ray session directory
(``/tmp/ray/session_...``: gcs_server, raylet, dashboard, monitors) and all their
descendants -- Ray workers (``ray::IDLE`` / ``ray::MapBatches(...)``) are raylet's children,
and are Ray daemons' even where they are not the driver's (``ray start`` clusters). Other Ray
sessions on the machine are not counted. A sampler polls every process of the tree every
0.25 s (user + system CPU of each (pid, start time)); the timed epoch's CPU is the sum over
processes of (last value seen - value at the epoch's start, 0 for a process started later);
a process that exits mid-epoch loses at most its last 0.25 s.

    scripts/loopback .venv/bin/python bench/peers.py [--n 128] [--scale 6] [--repeats 3] [--keep DIR]
    scripts/loopback .venv/bin/python bench/peers.py --smoke   # tiny, all loaders at once: the test
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

FRAMES = 10
METHODS = ["ours", "wds-simplejpeg", "wds-pil", "mosaic", "raydata", "bare"]
LABELS = {
    "ours": "our ingest: ShardStream -> AVBatch",
    "wds-simplejpeg": "webdataset + DataLoader(2), simplejpeg",
    "wds-pil": "webdataset + DataLoader(2), its PIL decoder",
    "mosaic": "MosaicML Streaming + DataLoader(2), simplejpeg",
    "raydata": "naive Ray Data: read_webdataset + map_batches",
    "bare": "bare loop, one process, simplejpeg",
}
MARK = "@@peers "  # the child's protocol lines on stdout (Ray may print there too)


# ============================================================================== data
def prepare(root: str, n: int, scale: int, mosaic: bool) -> tuple[str, str | None]:
    """The shards (``bench/ingest.py``'s generator) and their MDS copy, made once under root."""
    from ingest import make_data

    shards = os.path.join(root, "shards-10x")
    if not os.path.exists(os.path.join(shards, "train.manifest.json")):
        make_data(root, n, scale)
    mds = os.path.join(root, "mds")
    if not mosaic:
        return shards, None
    if not os.path.exists(os.path.join(mds, "index.json")):
        to_mds(shards, mds)
    return shards, mds


def shard_paths(url: str) -> list[str]:
    with open(os.path.join(url, "train.manifest.json")) as f:
        return [os.path.join(url, e["name"]) for e in json.load(f)["shards"]]


def to_mds(shards: str, out: str) -> None:
    """The same samples as MDS: key, ten JPEGs and the audio ``.npy`` as bytes (no re-encode)."""
    import_streaming()
    from streaming.base import MDSWriter

    from data_pipeline.tario import iter_tar_samples

    columns = {"key": "str", **{f"f{t:02d}": "bytes" for t in range(FRAMES)}, "audio": "bytes"}
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with MDSWriter(out=tmp, columns=columns, compression=None, size_limit=1 << 25) as w:
        for path in shard_paths(shards):
            with open(path, "rb") as f:
                for key, mem in iter_tar_samples(f, os.path.basename(path)):
                    w.write({"key": key, "audio": bytes(mem["audio.npy"]),
                             **{f"f{t:02d}": bytes(mem[f"f{t:02d}.jpg"]) for t in range(FRAMES)}})
    os.replace(tmp, out)


def import_streaming():
    """MosaicML Streaming's core (``streaming.base``: ``StreamingDataset``, ``MDSWriter``).

    ``import streaming`` also imports its dataset zoo (``streaming.text`` / ``vision`` /
    ``multimodal``: tokenizers from ``transformers``), and ``streaming.base.dataloader`` imports two
    ``transformers`` classes for isinstance checks inside ``StreamingDataLoader``. This bench uses
    neither (plain torch ``DataLoader``), and ``transformers`` + ``tokenizers`` (~140 MB, pinned by
    streaming to versions that conflict with this project's numpy) are not installed: so when
    ``transformers`` is missing, the package is registered without running its ``__init__`` and
    the two classes get empty stand-ins. With ``transformers`` installed this is a plain import."""
    import importlib.util

    if "streaming.base" in sys.modules:
        return sys.modules["streaming.base"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        import types

        spec = importlib.util.find_spec("streaming")
        if spec is None:
            raise
        if "streaming" not in sys.modules:
            pkg = types.ModuleType("streaming")
            pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules["streaming"] = pkg
        for name, cls in (("feature_extraction_utils", "BatchFeature"),
                          ("tokenization_utils_base", "BatchEncoding")):
            mod = types.ModuleType(f"transformers.{name}")
            setattr(mod, cls, type(cls, (dict,), {}))
            sys.modules.setdefault(f"transformers.{name}", mod)
    import streaming.base

    return streaming.base


def have_streaming() -> bool:
    try:
        import_streaming()
        return True
    except ImportError:
        return False


# ============================================================================== consumers
def _decode_frames(jpegs, out=None) -> np.ndarray:
    import simplejpeg

    if out is None:
        return np.stack([simplejpeg.decode_jpeg(b, colorspace="RGB") for b in jpegs])
    for t, b in enumerate(jpegs):
        simplejpeg.decode_jpeg(b, colorspace="RGB", buffer=out[t])
    return out


def _collate(samples):
    import torch

    keys, frames, audio = zip(*samples)
    return list(keys), torch.from_numpy(np.stack(frames)), torch.from_numpy(np.stack(audio))


def _wds_simplejpeg(s):
    return (s["__key__"], _decode_frames([s[f"f{t:02d}.jpg"] for t in range(FRAMES)]),
            np.load(io.BytesIO(s["audio.npy"]), allow_pickle=False))


def _wds_pil(s):  # after .decode("rgb8"): frames are uint8 HWC arrays, .npy loaded
    return s["__key__"], np.stack([s[f"f{t:02d}.jpg"] for t in range(FRAMES)]), s["audio.npy"]


def _raydata_decode(batch: dict) -> dict:
    keys = batch["__key__"]
    frames = np.stack([_decode_frames([batch[f"f{t:02d}.jpg"][i] for t in range(FRAMES)])
                       for i in range(len(keys))])
    audio = np.stack([np.load(io.BytesIO(bytes(a)), allow_pickle=False) for a in batch["audio.npy"]])
    return {"key": keys, "frames": frames, "audio": audio}


class Loader:
    """``epoch(e)`` -> iterator of batches; ``keys(batch)`` -> the batch's sample keys."""

    def __init__(self, epoch, keys, session_dir: str | None = None, info: dict | None = None):
        self.epoch, self.keys, self.session_dir, self.info = epoch, keys, session_dir, info or {}


def _ray_session() -> str:
    import ray

    return ray._private.worker.global_worker.node.get_session_dir_path()


def make_loader(method: str, data: str, mds: str | None, cores: int, batch: int,
                decode_on: str | None = None) -> Loader:
    if method == "ours":
        from avmoe.ray_env import init_local_ray

        init_local_ray(num_cpus=cores)
        from data_pipeline.ingest import IngestConfig, ShardStream

        kw = {"decode_on": decode_on} if decode_on else {}
        s = ShardStream(IngestConfig(url=data, batch_size=batch, **kw))
        info = {k: getattr(s.cfg, k) for k in ("shuffle_buffer", "prefetch_batches", "read_concurrency",
                                                 "decode_on", "decode_threads") if hasattr(s.cfg, k)}
        if hasattr(s, "decode_on"):
            info["decode_on"] = s.decode_on  # "auto" resolved
        return Loader(s.epoch, lambda b: b.keys, _ray_session(), info)
    if method == "raydata":
        from avmoe.ray_env import init_local_ray

        ray = init_local_ray(num_cpus=cores)
        ds = ray.data.read_webdataset(shard_paths(data), decoder=None).map_batches(
            _raydata_decode, batch_size=batch, batch_format="numpy")
        ds.context.enable_progress_bars = False
        return Loader(lambda e: ds.iter_batches(batch_size=batch, batch_format="numpy"),
                      lambda b: [str(k) for k in b["key"]], _ray_session())
    if method == "bare":
        from data_pipeline.tario import iter_tar_samples

        paths = shard_paths(data)

        def epoch(e):
            frames, audio, keys = None, [], []
            for path in paths:
                with open(path, "rb") as f:
                    for key, mem in iter_tar_samples(f, os.path.basename(path)):
                        jpegs = [mem[f"f{t:02d}.jpg"] for t in range(FRAMES)]
                        if frames is None:
                            import simplejpeg

                            h, w, _, _ = simplejpeg.decode_jpeg_header(jpegs[0])
                            frames = np.empty((batch, FRAMES, h, w, 3), np.uint8)
                        _decode_frames(jpegs, frames[len(keys)])
                        audio.append(np.load(io.BytesIO(mem["audio.npy"]), allow_pickle=False))
                        keys.append(key)
                        if len(keys) == batch:
                            yield keys, frames, np.stack(audio)
                            frames, audio, keys = np.empty_like(frames), [], []
            if keys:
                yield keys, frames[:len(keys)], np.stack(audio)

        return Loader(epoch, lambda b: b[0])

    import torch
    from torch.utils.data import DataLoader

    if method in ("wds-simplejpeg", "wds-pil"):
        import webdataset as wds

        ds = wds.WebDataset(shard_paths(data), shardshuffle=False, empty_check=False)
        ds = (ds.map(_wds_simplejpeg) if method == "wds-simplejpeg"
              else ds.decode("rgb8").map(_wds_pil)).batched(batch, collation_fn=_collate)
        dl = DataLoader(ds, batch_size=None, num_workers=cores, persistent_workers=True)
    elif method == "mosaic":
        import_streaming()
        from streaming.base import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()

        class Decoded(StreamingDataset):
            def get_item(self, sample_id: int, retry: int = 7):
                s = super().get_item(sample_id, retry)
                return (s["key"], _decode_frames([s[f"f{t:02d}"] for t in range(FRAMES)]),
                        np.load(io.BytesIO(s["audio"]), allow_pickle=False))

        ds = Decoded(local=mds, remote=None, shuffle=False, batch_size=batch)
        dl = DataLoader(ds, batch_size=batch, num_workers=cores, persistent_workers=True,
                        collate_fn=_collate)
    else:
        raise SystemExit(f"unknown method {method!r}")
    torch.set_num_threads(1)
    return Loader(lambda e: iter(dl), lambda b: b[0])


def run_epoch(loader: Loader, e: int) -> dict:
    keys: list[str] = []
    t0 = time.perf_counter()
    it = loader.epoch(e)  # "iterator created"
    first = None
    for b in it:
        if first is None:
            first = time.perf_counter() - t0
        keys.extend(str(k) for k in loader.keys(b))
    wall = time.perf_counter() - t0
    return {"n": len(keys), "unique": len(set(keys)), "wall_s": wall, "first_batch_s": first,
            "keys_sha": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]}


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ``ru_maxrss``: Linux carries the
    parent's peak over fork + exec into it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def say(event: str, **kw) -> None:
    print(MARK + json.dumps({"event": event, **kw}), flush=True)


def child(method: str, data: str, mds: str | None, cores: int, batch: int, decode_on: str | None) -> None:
    """One consumer: setup -> (go) cold epoch -> (go) timed epoch -> (exit). The parent measures."""
    import psutil

    loader = make_loader(method, data, mds, cores, batch, decode_on)
    setup_s = time.time() - psutil.Process().create_time()
    say("setup", setup_s=setup_s, session_dir=loader.session_dir, info=loader.info)
    sys.stdin.readline()
    cold = run_epoch(loader, 0)
    say("ready", cold=cold)
    sys.stdin.readline()
    timed = run_epoch(loader, 1)
    say("done", timed=timed)
    sys.stdin.readline()
    say("final", peak_rss_mib=peak_rss_mib())
    if loader.session_dir:
        import ray

        ray.shutdown()


# ============================================================================== measuring
def _kind(p, root: int) -> str:
    """Which part of the tree a process is, for the CPU breakdown."""
    try:
        name, cmd = p.name(), " ".join(p.cmdline())
    except Exception:
        return "other"
    if p.pid == root:
        return "consumer"
    if name in ("raylet", "gcs_server"):
        return name
    if "Agent" in name or "Agent" in cmd or "/agent" in cmd:
        return "ray daemons"  # dashboard / runtime-env agents
    if name.startswith("ray::") or cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "ray workers"  # a Ray worker: ray::IDLE, ray::MapBatches(...), ...
    if "ray_guard" in cmd or "/ray/" in cmd:
        return "ray daemons"  # dashboard, monitor, log monitor; avmoe's guard
    return "loader workers"


class TreeMeter:
    """CPU seconds and memory of the consumer's process tree (see the module docstring)."""

    def __init__(self, root: int, session_dir: str | None, interval: float = 0.25):
        import psutil

        self.psutil, self.root, self.interval = psutil, psutil.Process(root), interval
        self.anchors = [self.root]
        if session_dir:
            tag = os.path.basename(session_dir.rstrip("/"))
            for p in psutil.process_iter(["cmdline"]):
                if p.pid != root and tag in " ".join(p.info["cmdline"] or []):
                    self.anchors.append(p)
        self.session_anchors = len(self.anchors) - 1
        self.last: dict[tuple, tuple[float, str]] = {}
        self.start: dict[tuple, float] | None = None
        self.peak_root_rss = self.peak_tree_pss = 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.polls = 0

    def procs(self):
        seen = {}
        for a in self.anchors:
            try:
                for p in [a] + a.children(recursive=True):
                    seen[p.pid] = p
            except self.psutil.Error:
                pass
        return list(seen.values())

    def poll(self, memory: bool = True) -> None:
        pss, rss = 0, 0
        with self.lock:
            for p in self.procs():
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        k = (p.pid, p.create_time())
                        self.last[k] = (t.user + t.system, _kind(p, self.root.pid))
                        if memory:
                            pss += p.memory_full_info().pss
                            if p.pid == self.root.pid:
                                rss = p.memory_info().rss
                except self.psutil.Error:
                    pass
            self.polls += 1
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self.peak_root_rss = max(self.peak_root_rss, rss)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()

    def begin_cpu(self) -> None:
        self.poll()
        with self.lock:
            self.start = {k: v[0] for k, v in self.last.items()}

    def cpu(self) -> dict[str, float]:
        """CPU seconds since ``begin_cpu``, by kind of process, and the count of processes."""
        self.poll()
        out: dict[str, float] = {}
        n = 0
        with self.lock:
            for k, (c, kind) in self.last.items():
                d = c - self.start.get(k, 0.0)
                if d > 0:
                    out[kind] = out.get(kind, 0.0) + d
                    n += 1
        out["_processes"] = n
        return out


def read_event(proc, want: str, log: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=60)
            with open(log) as f:
                tail = f.read()[-4000:]
            raise RuntimeError(f"consumer exited ({proc.returncode}) before {want!r}:\n{tail}")
        if line.startswith(MARK):
            msg = json.loads(line[len(MARK):])
            if msg["event"] != want:
                raise RuntimeError(f"consumer said {msg['event']!r}, expected {want!r}")
            return msg


def measure(method: str, data: str, mds: str | None, cores: int, batch: int, work: str,
            timeout: float, decode_on: str | None = None) -> dict:
    log = os.path.join(work, f"{method}.log")
    t_start = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--data", data,
           "--cores", str(cores), "--batch", str(batch)] + (["--mds", mds] if mds else []) + \
        (["--decode-on", decode_on] if decode_on and method == "ours" else [])
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                                text=True, cwd=REPO, start_new_session=False)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        setup = read_event(proc, "setup", log)
        meter = TreeMeter(proc.pid, setup.get("session_dir"))
        meter.poll()
        meter.thread.start()

        def go():
            proc.stdin.write("go\n")
            proc.stdin.flush()

        go()
        cold = read_event(proc, "ready", log)["cold"]
        meter.begin_cpu()
        go()
        timed = read_event(proc, "done", log)["timed"]
        cpu = meter.cpu()
        meter.stop.set()
        meter.thread.join()
        go()
        final = read_event(proc, "final", log)
        proc.stdin.close()
        proc.wait(timeout=120)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    procs = cpu.pop("_processes")
    total = sum(cpu.values())
    return {"method": method, "n": timed["n"], "unique": timed["unique"], "keys_sha": timed["keys_sha"],
            "samples_per_s": timed["n"] / timed["wall_s"], "samples_per_cpu_s": timed["n"] / total,
            "cpu_s": total, "cpu_by_kind": cpu, "processes": procs,
            "session_anchors": meter.session_anchors,
            "first_batch_cold_s": cold["first_batch_s"], "first_batch_warm_s": timed["first_batch_s"],
            "wall_s": timed["wall_s"], "cold_wall_s": cold["wall_s"], "setup_s": setup["setup_s"],
            "consumer_peak_rss_mib": final["peak_rss_mib"], "total_s": time.time() - t_start,
            "consumer_peak_rss_sampled_mib": meter.peak_root_rss / 2**20,
            "tree_peak_pss_mib": meter.peak_tree_pss / 2**20, "polls": meter.polls,
            "info": setup.get("info") or {}}


# ============================================================================== report
def fmt(vals, spec=".1f") -> str:
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, spec)
    return f"{format(med, spec)} ({format(min(vals), spec)}-{format(max(vals), spec)})"


GOALS = [  # (label, numerator key, method, denominator method, threshold, higher is better)
    ("ours per CPU-second / bare loop's", "samples_per_cpu_s", "bare", 0.8),
    ("ours per CPU-second / webdataset (simplejpeg)'s", "samples_per_cpu_s", "wds-simplejpeg", 1.5),
    ("ours wall samples/s / webdataset (simplejpeg)'s", "samples_per_s", "wds-simplejpeg", 1.3),
]


def report(results: dict[str, list[dict]], args, load_before, load_after) -> list[str]:
    lines = []
    med = statistics.median
    lines.append("| loader | samples | wall samples/s | samples per CPU-second | first batch cold / warm (s) "
                 "| consumer peak RSS (MiB) | tree peak PSS (MiB) |")
    lines.append("|---|---|---|---|---|---|---|")
    bare_sha = results["bare"][0]["keys_sha"] if "bare" in results else None
    for m, rs in results.items():
        same = "" if bare_sha is None or m == "bare" else (
            " (= bare's keys)" if all(r["keys_sha"] == bare_sha for r in rs) else " (**keys differ**)")
        info = rs[0].get("info") or {}
        label = LABELS[m] + (f" (decode_on={info['decode_on']})" if info.get("decode_on") else "")
        lines.append(
            f"| {label} | {rs[0]['n']}{same} | {fmt([r['samples_per_s'] for r in rs])} "
            f"| {fmt([r['samples_per_cpu_s'] for r in rs])} "
            f"| {fmt([r['first_batch_cold_s'] for r in rs], '.2f')} / "
            f"{fmt([r['first_batch_warm_s'] for r in rs], '.2f')} "
            f"| {fmt([r['consumer_peak_rss_mib'] for r in rs], '.0f')} "
            f"| {fmt([r['tree_peak_pss_mib'] for r in rs], '.0f')} |")
    lines.append("")
    lines.append("CPU milliseconds per sample in the timed epoch, by process (median over repeats):")
    lines.append("")
    kinds = sorted({k for rs in results.values() for r in rs for k in r["cpu_by_kind"]},
                   key=lambda k: ["consumer", "loader workers", "ray workers", "raylet", "gcs_server",
                                  "ray daemons"].index(k) if k in ("consumer", "loader workers",
                                                                    "ray workers", "raylet", "gcs_server",
                                                                    "ray daemons") else 99)
    lines.append("| loader | " + " | ".join(kinds) + " | total |")
    lines.append("|---|" + "---|" * (len(kinds) + 1))
    for m, rs in results.items():
        cells = [med([r["cpu_by_kind"].get(k, 0.0) * 1e3 / r["n"] for r in rs]) for k in kinds]
        total = med([r["cpu_s"] * 1e3 / r["n"] for r in rs])
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{c:.2f}" if c else "-" for c in cells)
                     + f" | {total:.2f} |")
    lines.append("")
    if "ours" not in results:
        return lines
    lines.append("| goal (issue 16) | measured: ratio of medians (per-repeat min-max) | met |")
    lines.append("|---|---|---|")
    ours = results["ours"]

    def ratio_row(label, key, other, thr, higher=True):
        if other not in results:
            lines.append(f"| {label} >= {thr}x | not measured | - |")
            return
        theirs = results[other]
        r = med([x[key] for x in ours]) / med([x[key] for x in theirs])
        per = [a[key] / b[key] for a, b in zip(ours, theirs)]
        ok = r >= thr if higher else r <= thr
        sign = ">=" if higher else "<="
        spread = f" ({min(per):.2f}-{max(per):.2f})" if len(per) > 1 else ""
        lines.append(f"| {label} {sign} {thr}x | {r:.2f}x{spread} | {'yes' if ok else '**no**'} |")

    for label, key, other, thr in GOALS:
        ratio_row(label, key, other, thr)
    fb = med([r["first_batch_cold_s"] for r in ours])
    fbw = med([r["first_batch_warm_s"] for r in ours])
    lines.append(f"| ours first batch after the iterator is created <= 3 s | cold {fb:.2f} s, "
                 f"warm {fbw:.2f} s | {'yes' if fb <= 3 else '**no**'} (cold) |")
    ratio_row("ours consumer peak RSS / webdataset (simplejpeg)'s", "consumer_peak_rss_mib",
              "wds-simplejpeg", 1.25, higher=False)
    lines.append("")
    lines.append(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="videos in the 1x set (32 per shard)")
    p.add_argument("--scale", type=int, default=6, help="replicas of the 1x set streamed per epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--keep", help="make / reuse the data in this directory")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--decode-on", help="our ingest's IngestConfig.decode_on (default: the ingest's default)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per consumer")
    p.add_argument("--smoke", action="store_true",
                   help="16 samples, every loader at once, Mosaic only if installed: checks that it "
                        "runs, measures nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--mds", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.data, args.mds, args.cores, args.batch, args.decode_on)
        return 0
    if args.smoke:
        args.n, args.scale, args.repeats = 16, 1, 1
    methods = [m for m in args.methods.split(",") if m]
    if "mosaic" in methods and not have_streaming():
        if not args.smoke:
            raise SystemExit("mosaic: `streaming` is not installed (pip install --no-deps -r "
                             "bench/requirements.txt), or leave it out with --methods")
        print("mosaic: skipped (`streaming` is not installed)", flush=True)
        methods.remove("mosaic")

    import psutil

    root = args.keep or tempfile.mkdtemp(prefix="bench-peers-")
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-peers-logs-")
    try:
        t0 = time.time()
        data, mds = prepare(root, args.n, args.scale, "mosaic" in methods)
        with open(os.path.join(data, "train.manifest.json")) as f:
            m = json.load(f)
        load_before = os.getloadavg()[0]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB, python {platform.python_version()}; "
              f"{m['num_samples']} samples in {m['num_shards']} shards "
              f"({m['total_bytes'] / m['num_samples'] / 1e6:.2f} MB each), batch {args.batch}, "
              f"{args.cores} cores for every loader; data ready in {time.time() - t0:.0f} s; "
              f"load average {load_before:.2f}", flush=True)
        results: dict[str, list[dict]] = {mm: [] for mm in methods}

        def show(rep, mm, r):
            print(f"repeat {rep} {mm:>15}: {r['n']} samples, {r['samples_per_s']:.1f} samples/s, "
                  f"{r['samples_per_cpu_s']:.1f} samples/CPU-s ({r['processes']} processes, "
                  f"{r['session_anchors']} found by session), first batch {r['first_batch_cold_s']:.2f} / "
                  f"{r['first_batch_warm_s']:.2f} s, RSS {r['consumer_peak_rss_mib']:.0f} MiB, tree PSS "
                  f"{r['tree_peak_pss_mib']:.0f} MiB; {r['total_s']:.0f} s in all; load "
                  f"{os.getloadavg()[0]:.2f}" + (f"; {r['info']}" if r.get("info") else ""), flush=True)

        if args.smoke:  # every consumer at once: checks that each runs and reports, measures nothing
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(methods)) as ex:
                futures = {mm: ex.submit(measure, mm, data, mds, args.cores, args.batch, work, args.timeout,
                                         args.decode_on) for mm in methods}
                for mm, fut in futures.items():
                    results[mm].append({**fut.result(), "repeat": 0})
                    show(0, mm, results[mm][-1])
        for rep in range(0 if args.smoke else args.repeats):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]
            for mm in order:
                results[mm].append({**measure(mm, data, mds, args.cores, args.batch, work, args.timeout,
                                              args.decode_on), "repeat": rep})
                show(rep, mm, results[mm][-1])
        load_after = os.getloadavg()[0]
        print()
        print("\n".join(report(results, args, load_before, load_after)), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "load_before": load_before, "load_after": load_after,
                           "results": results}, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
