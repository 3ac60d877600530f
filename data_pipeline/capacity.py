"""The capacity planner: ``python -m data_pipeline plan --task ave --preset paper --gpus 256``.

For a cluster of that many GPUs it answers what the data side and the storage must deliver so
that the GPUs run at a stated MFU, as a table (``Plan.render``; ``--explain`` adds each
figure's formula with its inputs; ``--json`` gives ``Plan.to_dict``). Every figure is a
``Figure`` with its value, formula, inputs and basis (measured, manifest, calibrated, default,
estimate). The figures, in order:

=============================  ===============================================================
model FLOPs per sample  F      ``avmoe.telemetry.flops.flops_per_sample`` (the MFU gauge's
                               counter: FlopCounterMode over forward + backward of the training
                               loss) on the task's model built from the preset, random init,
                               on CPU, at probe batches 1 and 2 in the shards' format; at the
                               plan's batch B: ``fixed / B + marginal`` (``marginal = step(2) -
                               step(1)``, ``fixed = step(1) - marginal``;
                               ``avmoe.capacity_model.flops_at``); cached per (task, preset,
                               config, frame size) in the calibration file
GPU peak  P                    ``avmoe.telemetry.flops.peak_flops_for(--gpu)``, bf16 dense
samples/s per GPU  r           ``mfu * P / F``
samples/s of the cluster  R    ``gpus * r``
step time                      ``batch_size / r`` (one micro-batch, per GPU)
decode rate per core  c        ``plan --calibrate`` (this machine, the ingest's decode function
                               ``data_pipeline.decode_task.decode_task`` on generated or given
                               shards, CPU time of one process) or the labelled default
                               ``1 / (b / 750 MB/s + T * S**2 * 6.27 ns)`` (anchors.md §0.3:
                               tar parse rate, and 240 AVE samples/s at 10 x 224**2)
decode CPU cores  D            ``R / c``, rounded up; with ``--decode-on trainer`` (the
                               ingest's ``decode_on="trainer"``: decode tasks leave the JPEG
                               frames to the training workers) ``R / c_r``, ``c_r`` the rate of
                               ``decode_task(decode_frames=False)`` (calibrated, else the
                               default ``750 MB/s / b``)
frame-decode cores per worker  ``--decode-on trainer``: ``r * (1 / c - 1 / c_r)``
decode tasks (readers)  W      ``D / decode_cpus_per_task``
ingest nodes                   ``ceil(D / ingest_node_cpus)``; ``--ingest-node-cpus 0``: none,
                               the decode tasks share the GPU nodes
data-path cores per GPU node   ``D / gpu_nodes`` (no ingest nodes) + frame-decode cores per
                               worker * workers per node, against the GPU node's spare CPUs
                               ``gpu_node_cpus - workers_per_node * cpus_per_worker``
bytes per sample  b            manifest ``total_bytes / num_samples`` (``--shards``), else an
                               estimate: a 1-sample synthetic pack at the default options with
                               its JPEG frames replaced by ``0.25 B/pixel`` (q90 natural video)
object-storage read bandwidth  ``R * b``
dataset bytes                  ``N * b`` (``N``: manifest, ``--dataset-samples`` or the official
                               training split's size)
shard size                     ``clamp(N * b / (k * W), 100 MB, 1 GB)`` (``k`` shards per
                               reader, ``--shards-per-reader``, default 4)
shard count                    ``ceil(N * b / shard size)``
decoded batch bytes  B         ``sum(data_pipeline.sample.empty_columns(spec, batch).nbytes)``;
                               ``--decode-on trainer``: the frames replaced by their JPEG bytes
                               (read from the first shard's samples, else the estimate)
object store per trainer node  ``B * prefetch * gpus_per_node`` (every worker's prefetched
                               decoded batches)
object store per ingest node   ``B * ingest_node_cpus / decode_cpus_per_task`` (one output block
                               of every running decode task)
checkpoint bytes               ``avmoe.train.checkpoint.save``: DeepSpeed
                               ``save_checkpoint(exclude_frozen_parameters=True)``: frozen
                               weights 0 B; trainable params in fp32 (4 B) + Adam exp_avg and
                               exp_avg_sq (8 B) + under ZeRO >= 1 the fp32 master partition
                               (4 B): ``n_train * (12 | 16) + buffers + 400 B * tensors``
largest rank's bytes           ZeRO 0: all of it on rank 0; ZeRO >= 1: ``n_train * 4 + buffers +
                               n_train * 12 / gpus`` (rank 0: module + its optimizer partition)
time per save                  ``largest rank's bytes / ckpt_bandwidth`` (ranks write in
                               parallel)
predicted data wait            ``predict_data_wait(c, decode_cpus, step time, batch, gpus)``
                               (only with ``--decode-cpus``)
=============================  ===============================================================

Layering: ``data_pipeline`` does not import ``avmoe`` at module level; the model-side figures
come from ``avmoe.capacity_model``, loaded by name (``PlanError`` if it is not importable).
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline import storage
from data_pipeline.errors import DataPipelineError

CALIBRATION_VERSION = 1
CALIBRATION_FILE = "plan-calibration.json"

# Without calibration (../shared/spec/anchors.md §0.3, a 2-vCPU AMD EPYC VM): a decode task's
# work besides the JPEG frames (ranged read, sha256, tar parse, audio copy) runs at about the
# tar parse rate, 750-930 MB/s per core (the low end, for the sha256); a whole AVE-like sample
# (10 JPEG frames of 224^2 at ~0.25 B/pixel + 10 s of int16 audio: 765,568 B) decodes at
# ≈240 samples/s per core. The rest of those 1/240 s is the frames' cost per pixel.
DEFAULT_PARSE_BYTES_PER_S = 750e6
DEFAULT_REF_RATE, DEFAULT_REF_PIXELS, DEFAULT_REF_BYTES = 240.0, 10 * 224 * 224, 765_568
DEFAULT_JPEG_S_PER_PIXEL = (1 / DEFAULT_REF_RATE - DEFAULT_REF_BYTES / DEFAULT_PARSE_BYTES_PER_S) \
    / DEFAULT_REF_PIXELS
# Without --shards: JPEG q90 of natural video frames, ≈2 bits per pixel (the synthetic frames of
# the probe pack compress far better than real ones, so their bytes are replaced by this).
NOMINAL_JPEG_BYTES_PER_PIXEL = 0.25
# Official training-split sizes (samples = videos, questions for MUSIC-AVQA); AVE / AVVP /
# MUSIC-AVQA val+test are the counts tests/test_real_annotations.py checks.
NOMINAL_TRAIN_SAMPLES = {"ave": 3339, "avvp": 10000, "avs-s4": 3452, "avs-ms3": 296,
                         "avqa": 31927}
MIN_SHARD_BYTES = 100_000_000
MAX_SHARD_BYTES = 1_000_000_000
# torch.save's per-tensor cost in a DeepSpeed checkpoint (zip entry + pickle record), measured
# on the tiny AVE preset (ZeRO 0: 433 B, ZeRO 1/2: 350 B per tensor).
CKPT_TENSOR_OVERHEAD = 400
DECODE_ON = ("ingest", "trainer")


class PlanError(DataPipelineError):
    """The planner cannot answer: a bad input (named), an unreadable calibration file, or the
    model package missing."""


# ============================================================================ data wait model
def predict_data_wait(decode_rate_per_core: float, decode_cpus: float, step_time_s: float,
                      batch_size: int, workers: int, *, efficiency: float = 1.0,
                      steps: int | None = None) -> float:
    """Predicted fraction of training wall time spent waiting for data (the quantity of the
    ``avmoe_data_wait_ratio`` gauge: wait / step wall time, wait included).

    demand = workers * batch_size / step_time_s   samples/s the trainers take when never waiting
    supply = decode_rate_per_core * decode_cpus * efficiency   samples/s the decode CPUs give

    Steady state (``steps=None``): 0 when supply >= demand, else ``1 - supply / demand`` (the
    pipeline runs at the supply rate, so a step takes ``workers * batch_size / supply`` of which
    ``step_time_s`` is compute).

    ``steps``: a run of that many steps also waits for the pipeline to fill before its first
    step: ``fill = batch_size * ceil(workers / max(decode_cpus, 1)) / (rate * efficiency)`` (each
    decode task decodes one batch on one core; the first batch of every worker must exist).
    Then ``total = fill + (steps - 1) * period + step_time_s`` with ``period = max(step_time_s,
    workers * batch_size / supply)``, and the fraction is ``(total - steps * step_time_s) /
    total``.

    ``efficiency`` (0..1]: the share of a CPU a decode task really gets (e.g. when decode
    shares cores with training workers).

    To compare with a measured run: ``decode_rate_per_core`` from ``plan --calibrate`` on the
    same shards (the ``samples_per_core_s`` of the calibration file), ``decode_cpus`` the CPUs
    the decode tasks hold (``--decode-cpus`` / ``decode_resources``), ``step_time_s`` a step's
    compute time with the wait excluded (``(avmoe_step_seconds_total -
    avmoe_data_wait_seconds_total) / avmoe_steps_total`` of one rank), ``workers`` the
    training workers and ``batch_size`` the per-worker batch; the measured side is
    ``avmoe_data_wait_seconds_total / avmoe_step_seconds_total``.
    """
    for name, v in (("decode_rate_per_core", decode_rate_per_core), ("step_time_s", step_time_s),
                    ("batch_size", batch_size), ("workers", workers)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    if decode_cpus < 0:
        raise ValueError(f"decode_cpus must be >= 0, got {decode_cpus!r}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    supply = decode_rate_per_core * decode_cpus * efficiency
    demand = workers * batch_size / step_time_s
    if supply <= 0:
        return 1.0
    if steps is None:
        return 0.0 if supply >= demand else 1.0 - supply / demand
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    fill = batch_size * math.ceil(workers / max(decode_cpus, 1.0)) / (decode_rate_per_core * efficiency)
    period = max(step_time_s, workers * batch_size / supply)
    total = fill + (steps - 1) * period + step_time_s
    return max(0.0, (total - steps * step_time_s) / total)


# ============================================================================ inputs / output
@dataclass
class PlanInputs:
    """What ``plan`` is asked (the CLI flags; see ``python -m data_pipeline plan --help``)."""

    task: str
    gpus: int
    preset: str = "paper"
    gpu: str = "h100"
    mfu: float = 0.4
    batch_size: int | None = None  # per GPU; None = the task's training default for the preset
    gpus_per_node: int = 8
    gpu_node_cpus: int = 192
    cpus_per_worker: float = 1.0
    ingest_node_cpus: int = 64
    decode_on: str = "ingest"
    decode_cpus_per_task: float = 1.0
    prefetch: int = 2
    shards: str | None = None
    split: str = "train"
    dataset_samples: int | None = None
    shards_per_reader: int = 4
    zero_stage: int = 0
    ckpt_bandwidth: float = 1e9  # bytes/s per writing rank
    decode_cpus: float | None = None  # a provision to predict the data wait for
    calibration: str | None = None
    storage_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        def need(ok: bool, flag: str, what: str, got) -> None:
            if not ok:
                raise PlanError(f"{flag} must be {what}, got {got!r}")

        need(isinstance(self.gpus, int) and self.gpus >= 1, "--gpus", "an integer >= 1", self.gpus)
        need(0 < self.mfu <= 1, "--mfu", "in (0, 1]", self.mfu)
        need(self.batch_size is None or self.batch_size >= 1, "--batch-size", ">= 1",
             self.batch_size)
        need(self.gpus_per_node >= 1, "--gpus-per-node", ">= 1", self.gpus_per_node)
        need(self.gpu_node_cpus >= 1, "--gpu-node-cpus", ">= 1", self.gpu_node_cpus)
        need(self.cpus_per_worker >= 0, "--cpus-per-worker", ">= 0", self.cpus_per_worker)
        need(self.ingest_node_cpus >= 0, "--ingest-node-cpus", ">= 0 (0: no ingest nodes)",
             self.ingest_node_cpus)
        need(self.decode_on in DECODE_ON, "--decode-on", " or ".join(DECODE_ON), self.decode_on)
        need(self.decode_cpus_per_task > 0, "--decode-cpus-per-task", "> 0",
             self.decode_cpus_per_task)
        need(self.prefetch >= 1, "--prefetch", ">= 1", self.prefetch)
        need(self.dataset_samples is None or self.dataset_samples >= 1, "--dataset-samples",
             ">= 1", self.dataset_samples)
        need(self.shards_per_reader >= 1, "--shards-per-reader", ">= 1", self.shards_per_reader)
        need(self.zero_stage in (0, 1, 2, 3), "--zero-stage", "0, 1, 2 or 3", self.zero_stage)
        need(self.ckpt_bandwidth > 0, "--ckpt-bandwidth", "> 0 bytes/s", self.ckpt_bandwidth)
        need(self.decode_cpus is None or self.decode_cpus >= 0, "--decode-cpus", ">= 0",
             self.decode_cpus)


@dataclass
class Figure:
    key: str
    label: str
    value: Any
    unit: str
    formula: str
    inputs: dict = field(default_factory=dict)
    basis: str = ""


@dataclass
class Plan:
    inputs: dict
    figures: list[Figure]
    notes: list[str]

    def __getitem__(self, key: str) -> Any:
        return self.figure(key).value

    def figure(self, key: str) -> Figure:
        for f in self.figures:
            if f.key == key:
                return f
        raise KeyError(key)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "figures": {f.key: asdict(f) for f in self.figures},
                "notes": self.notes}

    def render(self, explain: bool = False) -> str:
        i = self.inputs
        where = "ingest nodes" if i["ingest_node_cpus"] else "GPU nodes"
        head = (f"capacity plan: task {i['task']}, preset {i['preset']}, {i['gpus']} x {i['gpu']} "
                f"GPUs, MFU {i['mfu']:g}, batch {i['batch_size']}/GPU, decode tasks on {where}"
                + (", JPEG frames decoded by the training workers" if i["decode_on"] == "trainer"
                   else "") + f", ZeRO {i['zero_stage']}")
        rows = [(f.label, _fmt(f.value, f.unit), f.basis) for f in self.figures]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [head, "", f"{'figure':<{w0}}  {'value':>{w1}}  basis",
                 f"{'-' * w0}  {'-' * w1}  {'-' * 5}"]
        for f, (label, value, basis) in zip(self.figures, rows):
            lines.append(f"{label:<{w0}}  {value:>{w1}}  {basis}".rstrip())
            if explain:
                lines.append(f"{'':<{w0}}    = {f.formula}")
                if f.inputs:
                    args = ", ".join(f"{k}={_fmt_input(v)}" for k, v in f.inputs.items())
                    lines.append(f"{'':<{w0}}      with {args}")
        if self.notes:
            lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _si(v: float, unit: str) -> str:
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g} {p}{unit}"
    return f"{v:.3g} {unit}"


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if unit in ("FLOP", "FLOP/s", "B", "B/s"):
        return _si(float(v), unit)
    if unit == "s":
        return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"
    if unit == "%":
        return f"{v * 100:.1f} %"
    if isinstance(v, int):
        return f"{v:,}" + (f" {unit}" if unit else "")
    return (f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}") + (f" {unit}" if unit else "")


def _fmt_input(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ============================================================================ calibration file
def default_calibration_path() -> str:
    """``~/.cache/avmoe/plan-calibration.json`` (``AVMOE_CACHE_DIR`` / ``XDG_CACHE_HOME``
    move it, as every avmoe cache)."""
    return os.path.join(storage.cache_dir(), CALIBRATION_FILE)


def load_calibration(path: str) -> dict:
    """The calibration file (``{"version", "decode": {...}, "model": {...}}``), or an empty one
    when it does not exist; ``PlanError`` naming the file when it cannot be used."""
    empty = {"version": CALIBRATION_VERSION, "decode": {}, "model": {}}
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return empty
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"calibration file {path}: cannot be read ({e}); delete it or pass "
                        "--calibration with another path") from None
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
        raise PlanError(f"calibration file {path}: not a version-{CALIBRATION_VERSION} planner "
                        "calibration; delete it or pass --calibration with another path")
    for k in ("decode", "model"):
        if not isinstance(data.setdefault(k, {}), dict):
            raise PlanError(f"calibration file {path}: field {k!r} must be an object")
    return data


def save_calibration(path: str, data: dict) -> None:
    """Write atomically (a reader never sees half a file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".plan-calibration-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def decode_key(dataset: str, frame_size: int, audio_format: str) -> str:
    return f"{dataset}/{frame_size}px/{audio_format}"


# ============================================================================ model side
def dataset_of_task(task: str) -> str:
    """The ``data_pipeline`` dataset ``task`` trains on (asked of ``avmoe``); ``PlanError``."""
    return _model_call(_model_module().dataset_of, task)


def _model_module():
    try:
        return importlib.import_module("avmoe.capacity_model")
    except ImportError as e:
        raise PlanError(f"the planner needs the avmoe package for the model's FLOPs and parameter "
                        f"counts (avmoe.capacity_model does not import: {e}); run it from the "
                        "avmoe checkout's environment") from None


def _model_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LookupError as e:  # (a KeyError's str() would quote the message)
        raise PlanError(str(e.args[0]) if e.args else str(e)) from None
    except ValueError as e:
        raise PlanError(str(e)) from None


def model_figures(inputs: PlanInputs, manifest: dict | None, frame_size: int, cal: dict,
                  cal_path: str) -> tuple[dict, bool]:
    """(figures of ``avmoe.capacity_model.model_figures``, whether they came from the cache);
    a fresh count is stored in the calibration file."""
    cm = _model_module()
    key = _model_call(cm.model_key, inputs.task, inputs.preset, manifest, frame_size)
    hit = cal["model"].get(key)
    if isinstance(hit, dict) and "flops_marginal" in hit:
        return hit, True
    figs = _model_call(cm.model_figures, inputs.task, inputs.preset, manifest, frame_size)
    fresh = load_calibration(cal_path)  # re-read: a concurrent calibration may have written it
    fresh["model"][key] = figs
    save_calibration(cal_path, fresh)
    cal["model"][key] = figs
    return figs, False


# ============================================================================ data layout
def _manifest(url: str, split: str, storage_options: dict) -> dict:
    from data_pipeline.manifest import load_manifest

    return load_manifest(url, split, storage_options)


def _spec_and_decoded(manifest: dict, batch_size: int) -> tuple[Any, int]:
    from data_pipeline.datasets import get_dataset
    from data_pipeline.sample import SampleSpec, empty_columns

    ds = get_dataset(manifest["dataset"])
    spec = SampleSpec.from_manifest(manifest, ds)
    cols = empty_columns(spec, batch_size, ds)
    return spec, int(sum(a.nbytes for a in cols.values()))


def _probe_pack(dataset: str, out: str) -> str:
    """A 1-video synthetic pack of ``dataset`` at the default options (the layout probe)."""
    from data_pipeline.pack import PackOptions, pack
    from data_pipeline.synth import synth

    raw = os.path.join(out, "raw")
    synth(dataset, 1, raw, seed=0)
    sh = os.path.join(out, "shards")
    pack(dataset, raw, "train", sh, PackOptions(), progress=False)
    return sh


def _jpeg_bytes(url: str, manifest: dict, storage_options: dict, samples: int = 4) -> float:
    """Mean bytes of a sample's JPEG frame members, over the first ``samples`` samples of the
    first shard (one ranged read)."""
    from data_pipeline.tario import parse_members

    sh = manifest["shards"][0]
    n = min(samples, len(sh["spans"]))
    fs, path = storage.filesystem(url, **storage_options)
    end = sh["spans"][n - 1][0] + sh["spans"][n - 1][1]
    data = memoryview(fs.cat_file(storage.join(path, sh["name"]), start=0, end=end))
    total = 0
    for key, (off, length) in zip(sh["keys"][:n], sh["spans"][:n]):
        members = parse_members(data[off:off + length], key)
        total += sum(len(v) for k, v in members.items() if k.endswith(".jpg"))
    return total / n


def layout(inputs: PlanInputs, dataset: str) -> dict:
    """The per-sample figures of the data: from ``--shards``' manifest (measured), else from a
    1-video synthetic pack at the default options (decoded shapes exact; stored bytes an
    estimate, its JPEG frames at ``NOMINAL_JPEG_BYTES_PER_PIXEL``)."""
    if inputs.shards:
        m = _manifest(inputs.shards, inputs.split, inputs.storage_options)
        if m["dataset"] != dataset:
            raise PlanError(f"{inputs.shards}: its {inputs.split} split is dataset "
                            f"{m['dataset']!r}, but task {inputs.task!r} trains on {dataset!r}")
        spec, decoded = _spec_and_decoded(m, 1)
        total = sum(sh["bytes"] for sh in m["shards"])
        return {"source": "manifest", "estimate": False, "manifest": m,
                "jpeg_bytes_per_sample": _jpeg_bytes(inputs.shards, m, inputs.storage_options),
                "bytes_per_sample": total / m["num_samples"], "decoded_bytes_per_sample": decoded,
                "frame_size": spec.frame_size, "segments": spec.segments,
                "audio_format": spec.audio_format, "num_samples": m["num_samples"],
                "num_shards": len(m["shards"]), "total_bytes": total}
    with tempfile.TemporaryDirectory(prefix="avmoe-plan-probe-") as tmp:
        try:
            sh = _probe_pack(dataset, tmp)
        except ValueError as e:
            raise PlanError(f"dataset {dataset!r}: no synthetic layout probe ({e}); pass --shards") from None
        m = _manifest(sh, "train", {})
        spec, decoded = _spec_and_decoded(m, 1)
        total = sum(s["bytes"] for s in m["shards"])
        jpeg = 0
        for s in m["shards"]:
            with tarfile.open(os.path.join(sh, s["name"])) as tf:
                jpeg += sum(t.size for t in tf.getmembers() if t.name.endswith(".jpg"))
    frames = spec.segments * m["num_samples"]
    nominal_jpeg = spec.frame_size ** 2 * NOMINAL_JPEG_BYTES_PER_PIXEL
    per_sample = (total - jpeg + frames * nominal_jpeg) / m["num_samples"]
    return {"source": "estimate", "estimate": True, "manifest": None,
            "jpeg_bytes_per_sample": spec.segments * nominal_jpeg,
            "bytes_per_sample": per_sample, "decoded_bytes_per_sample": decoded,
            "frame_size": spec.frame_size, "segments": spec.segments,
            "audio_format": spec.audio_format, "num_samples": None, "num_shards": None,
            "total_bytes": None}


# ============================================================================ calibration
def _supports_frames_flag() -> bool:
    import inspect

    from data_pipeline.decode_task import decode_task

    return "decode_frames" in inspect.signature(decode_task).parameters


def measure_decode_rate(url: str, split: str = "train", storage_options: dict | None = None,
                        max_samples: int = 32, seconds: float = 2.0, batch: int = 8,
                        decode_frames: bool = True) -> dict:
    """Samples per CPU-second of the ingest's real decode function
    (``data_pipeline.decode_task.decode_task``: ranged fetch, sha256 check, tar parse, JPEG /
    audio / target decode into the preallocated columns) over the first ``max_samples``
    samples of a split, in this process (one core: simplejpeg and the rest are
    single-threaded). One warm-up pass, then passes until ``seconds`` of CPU time (at least
    two); CPU time (``time.process_time``) is what a core gives, wall time is recorded too.
    ``decode_frames=False``: the task leaves the JPEG frames to the consumer (the ingest's
    ``decode_on`` "trainer"; only where ``decode_task`` has that flag)."""
    from data_pipeline.datasets import get_dataset
    from data_pipeline.decode_task import decode_task
    from data_pipeline.sample import OK, SampleSpec

    storage_options = storage_options or {}
    m = _manifest(url, split, storage_options)
    ds = get_dataset(m["dataset"])
    spec = SampleSpec.from_manifest(m, ds)
    items: list[list] = []
    for sh in m["shards"]:
        for key, (off, length), sha in zip(sh["keys"], sh["spans"], sh["sample_sha256"]):
            if len(items) < max_samples:
                items.append([len(items), sh["name"], key, off, length, sha])
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    task = {"spec": [json.dumps({"batches": batches})]}
    fs, _ = storage.filesystem(url, **storage_options)
    max_gap = 0 if storage.is_local_fs(fs) else 1 << 20  # as the ingest sets it

    def one_pass() -> int:
        ok = 0
        extra = {} if decode_frames else {"decode_frames": False}
        for cols in decode_task(task, url, spec.to_dict(), storage_options, max_gap, ds, **extra):
            ok += int(cols[OK].sum())
        return ok

    if one_pass() != len(items):  # warm-up; a bad sample would make the rate meaningless
        raise PlanError(f"{url} {split}: some of the first {len(items)} samples do not decode "
                        f"(run python -m data_pipeline verify {url})")
    n = passes = 0
    c0, w0 = time.process_time(), time.perf_counter()
    while passes < 2 or time.process_time() - c0 < seconds:
        n += one_pass()
        passes += 1
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    total = sum(sh["bytes"] for sh in m["shards"])
    return {"samples_per_core_s": n / cpu, "samples": n, "passes": passes,
            "cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3),
            "wall_samples_per_s": n / wall, "dataset": m["dataset"],
            "frame_size": spec.frame_size, "segments": spec.segments,
            "audio_format": spec.audio_format, "bytes_per_sample": total / m["num_samples"]}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure_both(url: str, split: str, storage_options: dict | None, max_samples: int,
                  seconds: float) -> dict:
    entry = measure_decode_rate(url, split, storage_options, max_samples, seconds)
    if _supports_frames_flag():
        rest = measure_decode_rate(url, split, storage_options, max_samples, seconds,
                                   decode_frames=False)
        entry["samples_per_core_s_no_frames"] = rest["samples_per_core_s"]
    return entry


def calibrate(dataset: str, cal_path: str, shards: str | None = None, split: str = "train",
              storage_options: dict | None = None, seconds: float = 2.0,
              max_samples: int = 32) -> tuple[str, dict]:
    """Measure the decode rate per core of ``dataset`` on ``shards`` (or on a synthetic pack
    of 8 videos at the default options, generated here and deleted) and store it in the
    calibration file; returns (key, entry)."""
    if shards:
        m = _manifest(shards, split, storage_options or {})
        if m["dataset"] != dataset:
            raise PlanError(f"{shards}: its {split} split is dataset {m['dataset']!r}, not "
                            f"{dataset!r}")
        entry = _measure_both(shards, split, storage_options, max_samples, seconds)
        entry["source"] = f"shards {shards} ({split})"
    else:
        from data_pipeline.pack import PackOptions, pack
        from data_pipeline.synth import synth

        with tempfile.TemporaryDirectory(prefix="avmoe-plan-calibrate-") as tmp:
            try:
                synth(dataset, 8, os.path.join(tmp, "raw"), seed=0)
            except ValueError as e:
                raise PlanError(f"dataset {dataset!r}: cannot generate calibration shards ({e}); "
                                "pass --shards") from None
            sh = os.path.join(tmp, "shards")
            pack(dataset, os.path.join(tmp, "raw"), "train", sh, PackOptions(), progress=False)
            entry = _measure_both(sh, "train", {}, max_samples, seconds)
        entry["source"] = "synthetic shards (data_pipeline synth + pack, default options)"
    entry.update(host=platform.node(), cpu=_cpu_name(),
                 measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 function="data_pipeline.decode_task.decode_task")
    key = decode_key(entry["dataset"], entry["frame_size"], entry["audio_format"])
    data = load_calibration(cal_path)
    data["decode"][key] = entry
    save_calibration(cal_path, data)
    return key, entry


def default_decode_rate(bytes_per_sample: float, segments: int, frame_size: int,
                        frames: bool = True) -> float:
    """The uncalibrated decode rate per core (see ``DEFAULT_JPEG_S_PER_PIXEL``); ``frames=False``:
    without the JPEG frames."""
    t = bytes_per_sample / DEFAULT_PARSE_BYTES_PER_S
    if frames:
        t += segments * frame_size ** 2 * DEFAULT_JPEG_S_PER_PIXEL
    return 1 / t


# ============================================================================ the plan
def plan(inputs: PlanInputs) -> Plan:
    """Every figure for ``inputs`` (see the module docstring for the formulas)."""
    inputs.validate()
    cm = _model_module()
    gpu_peak = cm.peak_flops(inputs.gpu)
    if gpu_peak is None:
        raise PlanError(f"--gpu {inputs.gpu!r}: unknown device (no bf16 peak); known: "
                        f"{', '.join(cm.gpu_names())} (or set AVMOE_PEAK_FLOPS=<FLOP/s>)")
    cal_path = inputs.calibration or default_calibration_path()
    cal = load_calibration(cal_path)
    dataset = dataset_of_task(inputs.task)
    notes: list[str] = []

    lay = layout(inputs, dataset)
    mfig, cached = model_figures(inputs, lay["manifest"], lay["frame_size"], cal, cal_path)
    batch = inputs.batch_size or mfig["batch_size"]  # per GPU: --batch-size or the preset's

    figs: list[Figure] = []

    def add(key, label, value, unit, formula, inputs_=None, basis=""):
        f = Figure(key, label, value, unit, formula, dict(inputs_ or {}), basis)
        figs.append(f)
        return value

    # ---- compute side
    F = add("flops_per_sample", "model FLOPs per sample (fwd+bwd)", cm.flops_at(mfig, batch),
            "FLOP", "flops_fixed / batch_size + flops_marginal, from the MFU gauge's counter "
            "(flops_per_sample: FlopCounterMode, fwd+bwd of the training loss) at probe batches "
            "1 and 2: flops_marginal = step(2) - step(1), flops_fixed = step(1) - flops_marginal",
            {"task": mfig["task"], "preset": inputs.preset, "segments": mfig["num_segments"],
             "frame_size": mfig["frame_size"], "batch_size": batch,
             "flops_fixed": mfig["flops_fixed"], "flops_marginal": mfig["flops_marginal"]},
            "counted on CPU" + ("" if batch in (1, 2) else " at batches 1 and 2, affine in the batch")
            + (" (cached in the calibration file)" if cached else ""))
    P = add("gpu_peak_flops", f"GPU peak ({inputs.gpu}, bf16 dense)", gpu_peak, "FLOP/s",
            "peak_flops_for(gpu)", {"gpu": inputs.gpu},
            "AVMOE_PEAK_FLOPS" if os.environ.get("AVMOE_PEAK_FLOPS") else "datasheet table")
    r = add("samples_per_s_per_gpu", "samples/s per GPU", inputs.mfu * P / F, "",
            "mfu * peak / flops_per_sample", {"mfu": inputs.mfu, "peak": P, "flops_per_sample": F},
            f"at the stated MFU {inputs.mfu:g}")
    R = add("samples_per_s", "samples/s, all GPUs", inputs.gpus * r, "",
            "gpus * samples_per_s_per_gpu", {"gpus": inputs.gpus, "samples_per_s_per_gpu": r})
    step = add("step_time_s", "step time (one micro-batch)", batch / r, "s",
               "batch_size / samples_per_s_per_gpu", {"batch_size": batch,
                                                      "samples_per_s_per_gpu": r},
               "--batch-size" if inputs.batch_size else "the preset's training batch")

    # ---- decode
    b = lay["bytes_per_sample"]
    dkey = decode_key(dataset, lay["frame_size"], lay["audio_format"])
    entry = cal["decode"].get(dkey)
    calibrated = isinstance(entry, dict) and bool(entry.get("samples_per_core_s"))
    if calibrated:
        c = float(entry["samples_per_core_s"])
        c_basis = f"calibrated {entry.get('measured_at', '')} on {entry.get('host', '?')}"
        c_formula = "samples / CPU-seconds of decode_task (plan --calibrate)"
        c_inputs = {"key": dkey, "samples": entry.get("samples"),
                    "cpu_seconds": entry.get("cpu_seconds"), "source": entry.get("source")}
    else:
        c = default_decode_rate(b, lay["segments"], lay["frame_size"])
        c_basis = "DEFAULT, not measured here: run plan --calibrate"
        c_formula = ("1 / (bytes_per_sample / 750 MB/s + segments * frame_size^2 * "
                     f"{DEFAULT_JPEG_S_PER_PIXEL * 1e9:.3g} ns)")
        c_inputs = {"bytes_per_sample": b, "segments": lay["segments"],
                    "frame_size": lay["frame_size"]}
        notes.append(f"decode rate per core is the default (anchors.md §0.3: tar parse and JPEG "
                     f"costs), not measured on this machine: run `python -m data_pipeline plan "
                     f"--calibrate --task {inputs.task}` (calibration file {cal_path})")
    add("decode_rate_per_core", "decode rate per core", c, "samples/s", c_formula, c_inputs,
        c_basis)
    trainer_frames = inputs.decode_on == "trainer"
    if trainer_frames:  # the decode tasks skip the JPEG frames; the training workers decode them
        if calibrated and entry.get("samples_per_core_s_no_frames"):
            cr = float(entry["samples_per_core_s_no_frames"])
            add("decode_rate_per_core_no_frames", "decode rate per core, frames left out", cr,
                "samples/s", "samples / CPU-seconds of decode_task(decode_frames=False)",
                {"key": dkey}, c_basis)
        else:
            cr = default_decode_rate(b, lay["segments"], lay["frame_size"], frames=False)
            add("decode_rate_per_core_no_frames", "decode rate per core, frames left out", cr,
                "samples/s", "1 / (bytes_per_sample / 750 MB/s) (tar parse + sha256, anchors.md §0.3)",
                {"bytes_per_sample": b}, "DEFAULT, not measured here")
        cr = max(cr, c)  # leaving work out cannot make a task slower (measurement noise)
        rate = cr
    else:
        rate = c
    D_exact = R / rate
    D = add("decode_cores", "decode CPU cores (decode tasks)", math.ceil(D_exact - 1e-9), "",
            "ceil(samples_per_s / " + ("decode_rate_per_core_no_frames)" if trainer_frames else
                                       "decode_rate_per_core)"),
            {"samples_per_s": R, ("decode_rate_per_core_no_frames" if trainer_frames else
                                  "decode_rate_per_core"): rate, "exact": D_exact})
    W = add("decode_tasks", "decode tasks (readers)",
            max(1, math.ceil(D / inputs.decode_cpus_per_task - 1e-9)), "",
            "ceil(decode_cores / decode_cpus_per_task)",
            {"decode_cores": D, "decode_cpus_per_task": inputs.decode_cpus_per_task})
    gpu_nodes = add("gpu_nodes", f"GPU nodes ({inputs.gpus_per_node} GPUs)",
                    math.ceil(inputs.gpus / inputs.gpus_per_node), "",
                    "ceil(gpus / gpus_per_node)",
                    {"gpus": inputs.gpus, "gpus_per_node": inputs.gpus_per_node})
    workers_per_node = min(inputs.gpus_per_node, inputs.gpus)
    node_load = 0.0  # CPUs of a GPU node the data path needs besides the training workers
    if trainer_frames:
        j = 1 / c - 1 / rate
        per_worker = add("frame_decode_cores_per_worker", "frame-decode cores per training worker",
                         r * j, "", "samples_per_s_per_gpu * (1 / decode_rate_per_core - 1 / "
                         "decode_rate_per_core_no_frames)",
                         {"samples_per_s_per_gpu": r, "frame_cpu_s_per_sample": j},
                         "JPEG frames decoded in the training worker (IngestConfig.decode_on)")
        node_load += per_worker * workers_per_node
        notes.append(f"--decode-on trainer: each training worker decodes {r:.3g} samples/s of "
                     f"JPEG frames, {per_worker:.2f} of a core ({j * batch * 1e3:.3g} ms per "
                     f"step of {batch}); done in the training loop's own thread it adds that to "
                     f"the {step * 1e3:.3g} ms step (the MFU falls accordingly)")
    if inputs.ingest_node_cpus:
        add("ingest_nodes", f"ingest nodes ({inputs.ingest_node_cpus} CPUs)",
            math.ceil(D / inputs.ingest_node_cpus - 1e-9), "", "ceil(decode_cores / ingest_node_cpus)",
            {"decode_cores": D, "ingest_node_cpus": inputs.ingest_node_cpus})
    else:  # no ingest nodes: the decode tasks share the GPU nodes' CPUs
        add("ingest_nodes", "ingest nodes", 0, "", "0 (--ingest-node-cpus 0: decode tasks on the "
            "GPU nodes)", {})
        node_load += D / gpu_nodes
    if node_load:
        spare = inputs.gpu_node_cpus - workers_per_node * inputs.cpus_per_worker
        fits = node_load <= spare
        add("data_cores_per_gpu_node", "data-path cores per GPU node", node_load, "",
            ("decode_cores / gpu_nodes" if not inputs.ingest_node_cpus else "")
            + (" + " if trainer_frames and not inputs.ingest_node_cpus else "")
            + ("frame_decode_cores_per_worker * workers_per_node" if trainer_frames else ""),
            {"decode_cores": D, "gpu_nodes": gpu_nodes, "workers_per_node": workers_per_node},
            f"of {spare:g} spare CPUs per GPU node: " + ("fits" if fits else "DOES NOT FIT"))
        if not fits:
            notes.append(f"the data path needs {node_load:.1f} CPUs per GPU node, which has "
                         f"{spare:g} spare ({inputs.gpu_node_cpus} - {workers_per_node} x "
                         f"{inputs.cpus_per_worker:g} per training worker): decode on ingest "
                         "nodes (--decode-on ingest, --ingest-node-cpus > 0)")

    # ---- storage
    b_basis = ("manifest total_bytes / num_samples" if not lay["estimate"] else
               "ESTIMATE (no --shards): synthetic pack, JPEG at 0.25 B/pixel")
    add("bytes_per_sample", "stored bytes per sample", b, "B",
        "manifest: sum(shard bytes) / num_samples" if not lay["estimate"] else
        "(probe pack bytes - its JPEG bytes + segments * frame_size^2 * 0.25) / samples",
        {"num_samples": lay["num_samples"], "total_bytes": lay["total_bytes"]}
        if not lay["estimate"] else {"segments": lay["segments"], "frame_size": lay["frame_size"]},
        b_basis)
    if lay["estimate"]:
        notes.append("bytes per sample is an estimate (no --shards): pass --shards URL to use a "
                     "packed split's manifest")
    add("read_bandwidth", "object-storage read bandwidth", R * b, "B/s",
        "samples_per_s * bytes_per_sample", {"samples_per_s": R, "bytes_per_sample": b},
        "manifest" if not lay["estimate"] else "estimate")

    # ---- shards
    if inputs.dataset_samples:
        N, n_basis = inputs.dataset_samples, "--dataset-samples"
    elif lay["num_samples"] is not None:
        N, n_basis = lay["num_samples"], f"manifest ({inputs.split})"
    else:
        N, n_basis = NOMINAL_TRAIN_SAMPLES.get(dataset), "official training split (nominal)"
    if N is None:
        notes.append(f"no dataset size for {dataset!r}: pass --dataset-samples or --shards for "
                     "the shard figures")
        for key, label in (("dataset_bytes", "dataset bytes"), ("shard_bytes", "shard size"),
                           ("shard_count", "shard count"), ("epoch_seconds", "epoch time")):
            add(key, label, None, "", "needs the dataset size", {}, "n/a")
    else:
        add("dataset_samples", "dataset samples", int(N), "", "given", {}, n_basis)
        total = add("dataset_bytes", "dataset bytes", N * b, "B", "dataset_samples * bytes_per_sample",
                    {"dataset_samples": N, "bytes_per_sample": b})
        want = inputs.shards_per_reader * W
        if total / want < MIN_SHARD_BYTES:  # too small a dataset: shards of >= 100 MB
            count = max(1, math.floor(total / MIN_SHARD_BYTES))
        elif total / want > MAX_SHARD_BYTES:  # too large: shards of <= 1 GB
            count = math.ceil(total / MAX_SHARD_BYTES)
        else:
            count = want
        size = total / count  # what packing at that --shard-size gives
        add("shard_bytes", "shard size", size, "B",
            "dataset_bytes / shard_count; shard_count = shards_per_reader * decode_tasks, "
            "lowered to floor(dataset_bytes / 100 MB) or raised to ceil(dataset_bytes / 1 GB) "
            "to keep shards in 100 MB..1 GB (one shard if the dataset is under 100 MB)",
            {"dataset_bytes": total, "shards_per_reader": inputs.shards_per_reader,
             "decode_tasks": W}, f"pack --shard-size {max(1, math.ceil(size / 1e6))}MB")
        add("shard_count", "shard count", count, "", "see shard size",
            {"shards_per_reader": count / W}, f"{count / W:.2g} shards per reader")
        if count < inputs.shards_per_reader * W:
            notes.append(f"the dataset ({_si(total, 'B')}) is too small for {inputs.shards_per_reader} "
                         f"shards of >= 100 MB per reader ({W} readers): readers share shards, "
                         "which the ingest handles (decode tasks read sample spans with ranged "
                         "reads, not whole shards)")
        add("epoch_seconds", "epoch time", N / R, "s", "dataset_samples / samples_per_s",
            {"dataset_samples": N, "samples_per_s": R})

    # ---- memory
    frame_bytes = lay["segments"] * lay["frame_size"] ** 2 * 3
    if trainer_frames:  # blocks carry the JPEG bytes and their offsets instead of the frames
        block = (lay["decoded_bytes_per_sample"] - frame_bytes + lay["jpeg_bytes_per_sample"]
                 + 8 * (lay["segments"] + 1) + 1)
        block_formula = ("batch_size * (decoded_bytes_per_sample - frame_bytes + "
                         "jpeg_bytes_per_sample + 8 * (segments + 1) + 1)")
    else:
        block = lay["decoded_bytes_per_sample"]
        block_formula = "batch_size * sum(empty_columns(spec, 1).nbytes)"
    decoded_batch = block * batch
    add("decoded_batch_bytes", "decoded batch (per GPU)", decoded_batch, "B", block_formula,
        {"batch_size": batch, "decoded_bytes_per_sample": lay["decoded_bytes_per_sample"],
         **({"frame_bytes": frame_bytes, "jpeg_bytes_per_sample": lay["jpeg_bytes_per_sample"]}
            if trainer_frames else {})},
        "exact shapes (SampleSpec)" + (", JPEG frames as bytes" if trainer_frames else ""))
    add("object_store_trainer_node", "object store per trainer node",
        decoded_batch * inputs.prefetch * workers_per_node, "B",
        "decoded_batch_bytes * prefetch * workers_per_node",
        {"decoded_batch_bytes": decoded_batch, "prefetch": inputs.prefetch,
         "workers_per_node": workers_per_node}, "prefetched batches")
    if inputs.ingest_node_cpus:
        add("object_store_ingest_node", "object store per ingest node",
            decoded_batch * inputs.ingest_node_cpus / inputs.decode_cpus_per_task, "B",
            "decoded_batch_bytes * ingest_node_cpus / decode_cpus_per_task",
            {"decoded_batch_bytes": decoded_batch, "ingest_node_cpus": inputs.ingest_node_cpus,
             "decode_cpus_per_task": inputs.decode_cpus_per_task},
            "one output block per running decode task (at least)")

    # ---- checkpoint
    n_train = mfig["trainable_params"]
    per_param = 12 if inputs.zero_stage == 0 else 16
    tensors = (3 if inputs.zero_stage == 0 else 1) * mfig["trainable_tensors"] + mfig["buffer_tensors"]
    ck = add("checkpoint_bytes", f"checkpoint size (ZeRO {inputs.zero_stage})",
             n_train * per_param + mfig["buffer_bytes"] + CKPT_TENSOR_OVERHEAD * tensors, "B",
             "trainable_params * bytes_per_param + buffer_bytes + 400 * tensors; bytes_per_param "
             "= 4 fp32 weight + 8 Adam (exp_avg, exp_avg_sq) [+ 4 fp32 master, ZeRO >= 1]; "
             "frozen weights not saved (exclude_frozen_parameters=True)",
             {"trainable_params": n_train, "bytes_per_param": per_param,
              "buffer_bytes": mfig["buffer_bytes"], "tensors": tensors,
              "frozen_params_not_saved": mfig["frozen_params"]},
             "avmoe.train.checkpoint.save")
    if inputs.zero_stage == 0:
        rank0 = ck
        r0_formula = "checkpoint_bytes (ZeRO 0: rank 0 writes everything)"
        r0_inputs = {"checkpoint_bytes": ck}
    elif inputs.zero_stage in (1, 2):
        rank0 = (n_train * 4 + mfig["buffer_bytes"] + n_train * 12 / inputs.gpus
                 + CKPT_TENSOR_OVERHEAD * (mfig["trainable_tensors"] + mfig["buffer_tensors"]))
        r0_formula = ("trainable_params * 4 + buffer_bytes + trainable_params * 12 / gpus + 400 * "
                      "tensors (rank 0: module states + its optimizer partition)")
        r0_inputs = {"trainable_params": n_train, "buffer_bytes": mfig["buffer_bytes"],
                     "gpus": inputs.gpus}
    else:  # ZeRO 3 partitions the weights too (not checked against a real save)
        rank0 = (n_train * 16 / inputs.gpus + mfig["buffer_bytes"]
                 + CKPT_TENSOR_OVERHEAD * (mfig["trainable_tensors"] + mfig["buffer_tensors"]))
        r0_formula = ("trainable_params * 16 / gpus + buffer_bytes + 400 * tensors (ZeRO 3: "
                      "weights partitioned too; an estimate)")
        r0_inputs = {"trainable_params": n_train, "buffer_bytes": mfig["buffer_bytes"],
                     "gpus": inputs.gpus}
    add("checkpoint_bytes_rank0", "checkpoint bytes, largest rank", rank0, "B", r0_formula,
        r0_inputs)
    add("checkpoint_save_s", f"time per save @ {_si(inputs.ckpt_bandwidth, 'B/s')}",
        rank0 / inputs.ckpt_bandwidth, "s", "checkpoint_bytes_rank0 / ckpt_bandwidth",
        {"checkpoint_bytes_rank0": rank0, "ckpt_bandwidth": inputs.ckpt_bandwidth},
        "stated storage bandwidth per rank")

    # ---- a given decode provision
    if inputs.decode_cpus is not None:
        add("predicted_data_wait", f"predicted data wait ({inputs.decode_cpus:g} decode CPUs)",
            predict_data_wait(rate, inputs.decode_cpus, step, batch, inputs.gpus), "%",
            "0 if supply >= demand else 1 - supply / demand; supply = decode_rate_per_core * "
            "decode_cpus, demand = gpus * batch_size / step_time",
            {"decode_rate_per_core": rate, "decode_cpus": inputs.decode_cpus, "step_time_s": step,
             "batch_size": batch, "gpus": inputs.gpus}, "predict_data_wait")

    shown = asdict(inputs)
    shown.pop("storage_options", None)
    shown.update(batch_size=batch, calibration=cal_path, dataset=dataset)
    return Plan(shown, figs, notes)
