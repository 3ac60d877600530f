"""Checkpoint cost per ZeRO stage (results in bench/README.md, "Checkpoint cost").

For each preset (task:preset, by default the AVE and AVQA ``paper`` presets) and each ZeRO stage,
two CPU ranks (gloo, DeepSpeed's CPU accelerator) build the preset's model, wrap it with the
project's own engine construction (``avmoe.train.engine``: ``build_optimizer`` over
``model.trainable_parameters()``, ``deepspeed_config``, ``initialize``) and save it with the
trainer's own ``avmoe.train.checkpoint.save`` (DeepSpeed ``save_checkpoint(exclude_frozen_
parameters=True)`` + ``rank-R.json`` + ``trainer.json``). Measured per save:

* **save**: the ``checkpoint.save`` call, barrier to return, slowest rank (the step is blocked
  that long; DeepSpeed ends ``save_checkpoint`` with a barrier);
* **durable**: save + (decoupled engine: waiting for its writer process to commit) + ``fsync`` of
  the files this rank wrote, slowest rank;
* **bytes per rank**: the checkpoint directory walked after the save, every file attributed to
  the rank that wrote it by DeepSpeed's naming (``mp_rank_00_model_states.pt``, ``latest``, the
  ``zero_to_fp32.py`` / ``zero_to_torch.py`` recovery scripts and ``trainer.json``: rank 0;
  ``zero_pp_rank_R_*``, ``rank-R.json``: rank R), cross-checked against the paths each rank's
  checkpoint engine was asked to write (a file two ranks write is reported, counted once);
* a **breakdown** of the tensor payload of every DeepSpeed file (trainable weights, optimizer
  moments, fp32 master partition, other), read back with ``torch.load(mmap=True,
  weights_only=True)``.

The model: the real ``task.build_model(cfg)`` of the preset, frozen Swin-V2-L + HTS-AT included
(AVQA paper: 400 M parameters, 177 M trainable; peak RSS ~8 GB per rank). With ``--materialize
zero-grad`` (the default for non-tiny presets) it is built on the meta device and materialised
with ``to_empty`` and zeros (values change neither the bytes nor the ``torch.save`` time; the
Swin-V2-L random init would cost ~5 s per build), and the optimizer state is created by one step
of the torch AdamW each stage actually holds (ZeRO 0: over the parameters; ZeRO 1/2: over this
rank's flat fp32 partitions; ZeRO 3: over each fp32 sub-group partition) on zero gradients --
what a first real step allocates, without the frozen backbones' forward/backward (minutes per
step on a CPU). With ``--materialize step`` (the default for ``tiny``) the model is built
normally and one real training step runs (forward on ``task.example_batch``, ``task.loss``,
``engine.backward``, ``engine.step``).

Extra rows (``--async-stages``): DeepSpeed 0.19.8's ``DecoupledCheckpointEngine`` (``"checkpoint":
{"writer": {"type": "python", "decoupled": true, "data_parallel": "machine"}}``):
``save_checkpoint`` hands the state dicts to a writer process per rank (tensors through shared
memory) and returns; the files are complete only at the commit (``engine.step()`` waits for it
before the next optimizer step; here ``engine._commit_decoupled_checkpoint()`` right after the
save). It saves the same DeepSpeed engine as the default row of its stage and repeat (see
``Saver``), at least twice per engine: its first save moves every tensor into shared memory
(``first_save_s`` in ``--out``), the second is its steady state. A stage whose decoupled save
fails is reported with the error and not tried again. Unless ``--no-probe``, three more
configurations are tried (engine construction only) and their errors reported: the decoupled
engine without ``CROSS_SIZE``/``CROSS_RANK`` in the environment, without ``data_parallel``, and
the ``fast`` (libaio / DeepNVMe) writer.

Stages are interleaved within every repeat, in an order rotated per repeat, and every engine is
built afresh; the table shows each engine's last save, one per repeat.

    scripts/loopback .venv/bin/python bench/checkpoint.py [--repeats 3] [--out results.json]
    scripts/loopback .venv/bin/python bench/checkpoint.py --smoke --out s.json --keep DIR

Run it inside ``scripts/loopback`` (it starts torch.distributed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("AVMOE_CACHE_DIR", os.path.join(REPO, ".cache", "avmoe"))

WORLD = 2
PAPER_PRESETS = "ave:paper,avqa:paper"
SMOKE_PRESETS = "ave:tiny"

# "data_parallel" must be set: without it DeepSpeed 0.19.8's DataParallelWriterFactory.
# _get_data_parallel_config reads UniversalParallelInfo.dp_rank, which does not exist
# (AttributeError; see --probe). "machine": one writer per machine for the replicated
# (non-ZeRO-partitioned) state, every rank for its own ZeRO partition.
DECOUPLED = {"checkpoint": {"writer": {"type": "python", "decoupled": True, "data_parallel": "machine"}}}
DECOUPLED_DEFAULT_DP = {"checkpoint": {"writer": {"type": "python", "decoupled": True}}}
FAST_WRITER = {"checkpoint": {"writer": {"type": "fast", "data_parallel": "machine"}}}


# --------------------------------------------------------------------------- file accounting

_ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
_RANK_JSON = re.compile(r"rank-(\d+)\.json$")


def attribute(rel: str) -> tuple[int, str]:
    """(writing rank, kind) of a checkpoint file, from its path relative to the checkpoint
    directory (DeepSpeed's naming; our ``rank-R.json`` / ``trainer.json``)."""
    name = os.path.basename(rel)
    m = _ZERO_FILE.search(name)
    if m:
        return int(m.group(1)), f"{m.group(2)} states (ZeRO partition)"
    if re.fullmatch(r"mp_rank_\d+_model_states\.pt", name):
        return 0, "model states"
    m = _RANK_JSON.fullmatch(name)
    if m:
        return int(m.group(1)), "rank json"
    if name in ("trainer.json", "latest"):
        return 0, name
    if name in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's recovery scripts, global rank 0
        return 0, "recovery script"
    raise ValueError(f"checkpoint file {rel!r}: no rule says which rank wrote it")


def walk(d: str) -> list[dict[str, Any]]:
    """Every file under ``d``: relative path, bytes, writing rank, kind."""
    out = []
    for root, _, files in os.walk(d):
        for f in sorted(files):
            p = os.path.join(root, f)
            rel = os.path.relpath(p, d)
            rank, kind = attribute(rel)
            out.append({"path": rel, "bytes": os.path.getsize(p), "rank": rank, "kind": kind})
    return sorted(out, key=lambda e: e["path"])


def per_rank(files: list[dict[str, Any]], world: int = WORLD) -> list[int]:
    out = [0] * world
    for f in files:
        out[f["rank"]] += f["bytes"]
    return out


def _tensor_bytes(obj: Any, seen: set) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen or st.nbytes() == 0:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def breakdown(path: str) -> dict[str, int]:
    """Tensor payload of one DeepSpeed file by what it holds: ``weights`` (the module's trainable
    parameters and buffers), ``moments`` (the torch optimizer's state: Adam exp_avg /
    exp_avg_sq / step), ``fp32_master`` (ZeRO's fp32 partition of the weights), ``other``."""
    import torch

    from avmoe.train.engine import _safe_globals

    with torch.serialization.safe_globals(_safe_globals()):
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    out = {"weights": 0, "moments": 0, "fp32_master": 0, "other": 0}
    seen: set = set()
    for k, v in sd.items():
        if k == "module":
            out["weights"] += _tensor_bytes(v, seen)
        elif k == "optimizer" and isinstance(v, dict) and "state" in v:  # ZeRO 0: torch's state_dict
            out["moments"] += _tensor_bytes(v, seen)
        elif k == "optimizer_state_dict" and isinstance(v, dict):  # ZeRO >= 1
            for k2, v2 in v.items():
                if "fp32" in k2:
                    out["fp32_master"] += _tensor_bytes(v2, seen)
                elif "optimizer_state" in k2:
                    out["moments"] += _tensor_bytes(v2, seen)
                else:
                    out["other"] += _tensor_bytes(v2, seen)
        else:
            out["other"] += _tensor_bytes(v, seen)
    del sd
    return out


# --------------------------------------------------------------------------- worker side


def _log(rank: int, msg: str) -> None:
    print(f"[rank {rank} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(task, cfg, materialize: str, seed: int):
    import torch

    if materialize == "step":
        torch.manual_seed(seed)
        return task.build_model(cfg)
    with torch.device("meta"):
        model = task.build_model(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # touched (resident), as a trained model's memory is
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    return model


def materialize_state(engine, task, cfg, how: str, rank: int) -> None:
    """Give the engine the optimizer state a trained model has (see the module docstring)."""
    import torch

    if how == "step":
        batch = task.example_batch(cfg, batch_size=1, seed=rank)
        out = engine(batch)
        loss, _ = task.loss(out, batch, cfg)
        engine.backward(loss)
        engine.step()
        return
    stage = engine.zero_optimization_stage()
    if stage == 3:  # ZeRO 3 hands its torch optimizer one flat fp32 partition per sub-group at a time
        zopt = engine.optimizer
        for i, flat in enumerate(zopt.fp32_partitioned_groups_flat):
            flat.grad = torch.zeros_like(flat)
            zopt._optimizer_step(i)
            flat.grad = None
        return
    # ZeRO 0: the torch AdamW over the parameters; ZeRO 1/2: over this rank's flat fp32 partitions
    base = engine.optimizer if stage == 0 else engine.optimizer.optimizer
    params = [p for g in base.param_groups for p in g["params"] if p.numel()]
    for p in params:
        p.grad = torch.zeros_like(p)
    base.step()
    for p in params:
        p.grad = None


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def _maxrss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class Saver:
    """The checkpoint engine a save goes through. ``torch``: the engine the project's config
    gives (DeepSpeed's default TorchCheckpointEngine). ``decoupled``: DeepSpeed builds its
    DecoupledCheckpointEngine for the same DeepSpeed engine, exactly as at ``initialize`` with
    ``DECOUPLED`` merged into the config (``_configure_checkpointing`` re-run with that writer
    config), and the default engine and its writer flags are put back afterwards."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.saved = engine, name, None

    def __enter__(self):
        if self.name == "decoupled":
            from deepspeed.runtime.model_checkpointing.config import get_checkpoint_writer_config

            e = self.engine
            self.saved = (e.checkpoint_engine, e.save_non_zero_checkpoint, e.save_zero_checkpoint)
            e.save_non_zero_checkpoint = e.save_zero_checkpoint = False  # their values before init sets them
            e._config.checkpoint_config["writer"] = get_checkpoint_writer_config(DECOUPLED["checkpoint"])
            try:
                e._configure_checkpointing()
            finally:
                e._config.checkpoint_config["writer"] = None
        return self.engine.checkpoint_engine

    def abort(self) -> None:
        """After a failed save: end this rank's writer process without the commit that
        ``cleanup()`` would attempt (it waits on a writer that may have died -- e.g. writing
        into a directory removed after the failure -- on one rank only, and then enters a
        collective the other rank never reaches)."""
        ce = self.engine.checkpoint_engine
        if not ce.is_decoupled():
            return
        ce.commit_info, ce._cleanup_called = None, True
        proc = ce.ckpt_process
        if proc is not None:  # our own child, by handle
            proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        ce.ckpt_process = ce.save_queue = None

    def __exit__(self, *exc):
        if self.saved is not None:
            e = self.engine
            try:
                if exc[0] is None:
                    e.checkpoint_engine.cleanup()
                else:
                    self.abort()
            finally:
                e.checkpoint_engine, e.save_non_zero_checkpoint, e.save_zero_checkpoint = self.saved
        return False


def _fsync_rank_files(d: str, rank: int) -> None:
    for f in walk(d):
        if f["rank"] == rank:
            fd = os.open(os.path.join(d, f["path"]), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_series(engine, ce, saver: str, n: int, label: str, rep: int, root: str, rank: int, args: dict[str, Any],
                meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """``n`` saves of ``engine`` through checkpoint engine ``ce``. Returns (rank 0: one record per
    save; '' or the error every rank hit in a save -- raised at the same call on every rank, so
    the collectives stay aligned)."""
    import torch.distributed as dist

    from avmoe.train import checkpoint as ckpt_io
    from avmoe.train.trainer import RunState, _rng_state

    asked: list[str] = []  # the paths this rank's checkpoint engine is asked to write
    orig_save = ce.save

    def recording_save(state_dict, path):
        if getattr(ce, "ckpt_process", True) is not None:  # a decoupled rank without a writer drops it
            asked.append(path)
        return orig_save(state_dict, path)

    ce.save = recording_save
    records: list[dict[str, Any]] = []
    for i in range(n):
        d = os.path.join(root, f"{label}-rep{rep}-save{i}")
        asked.clear()
        state = RunState(epoch=1, batches_done=10, step=100 * (i + 1))
        dist.barrier()
        s0 = time.perf_counter()
        err = ""
        try:
            ckpt_io.save(engine, d, rank, trainer=state.__dict__, rank_state={"ingest": None, "rng": _rng_state()},
                         meta=meta)
        except Exception as e:  # noqa: BLE001 -- reported as the row's result
            err = f"{type(e).__name__}: {e}".strip() + _where(e)
        s1 = time.perf_counter()
        errs = _gather(err)
        if any(errs):
            ce.save = orig_save
            return records, " | ".join(sorted(set(e for e in errs if e)))
        if ce.is_decoupled():
            engine._commit_decoupled_checkpoint()
        s2 = time.perf_counter()
        dist.barrier()  # every rank's files are complete: attribute, fsync this rank's own
        _fsync_rank_files(d, rank)
        s3 = time.perf_counter()
        gathered = _gather({"save_s": s1 - s0, "commit_s": s2 - s1, "fsync_s": s3 - s2, "durable_s": s3 - s0,
                            "asked": sorted(os.path.relpath(p, d) for p in asked)})
        last = i == n - 1
        keep = args["keep"] and last
        if rank == 0:
            files = walk(d)
            dup = []
            for r, t in enumerate(gathered):
                for p in t["asked"]:
                    owner = next((f["rank"] for f in files if f["path"] == p), None)
                    if owner is None:
                        raise RuntimeError(f"rank {r} wrote {p}, which is not in {d}")
                    if owner != r:  # one file written by two ranks: reported, counted once
                        dup.append({"path": p, "also_written_by": r})
            rec = {"save": i, "save_s": max(t["save_s"] for t in gathered),
                   "durable_s": max(t["durable_s"] for t in gathered),
                   "commit_s": max(t["commit_s"] for t in gathered),
                   "per_rank_timing": [{k: v for k, v in t.items() if k != "asked"} for t in gathered],
                   "files": files, "bytes_per_rank": per_rank(files),
                   "total_bytes": sum(f["bytes"] for f in files), "duplicate_writes": dup}
            if last and (rep == 0 or keep):
                for f in files:
                    if f["path"].endswith(".pt"):
                        f["payload"] = breakdown(os.path.join(d, f["path"]))
            if keep:
                rec["dir"] = d
            else:
                shutil.rmtree(d, ignore_errors=True)
            records.append(rec)
        dist.barrier()
    ce.save = orig_save
    return records, ""


def one_engine(spec: dict[str, Any], stage: int, savers: list[str], rep: int, root: str, rank: int,
               args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Build one engine of ``spec`` at ZeRO ``stage`` and save it through each of ``savers`` in
    turn. Returns (rank 0: {saver: result}, else {}; {saver: error} on every rank)."""
    from avmoe.tasks import get_task
    from avmoe.train.engine import build_optimizer, build_scheduler, deepspeed_config, initialize

    task = get_task(spec["task"])
    cfg = task.config(preset=spec["preset"])
    opt_cfg = task.training_defaults(spec["preset"])
    t0 = time.perf_counter()
    model = build_model(task, cfg, spec["materialize"], seed=1234)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model.trainable_parameters(), opt_cfg.optimizer, opt_cfg.lr, opt_cfg.weight_decay)
    scheduler = build_scheduler(optimizer, opt_cfg, steps_per_epoch=100)
    ds_cfg = deepspeed_config(micro_batch=1, grad_accum=1, zero_stage=stage, bf16=False, grad_clip=0.0)
    t1 = time.perf_counter()
    engine, _, _ = initialize(model, optimizer, scheduler, ds_cfg)
    t2 = time.perf_counter()
    materialize_state(engine, task, cfg, spec["materialize"], rank)
    t3 = time.perf_counter()
    meta = {"zero_stage": stage, "world_size": WORLD, "task": task.full_name, "bench": True}
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for saver in savers:
        n = args["saves"] if saver == "torch" else max(2, args["saves"])  # decoupled: first + steady state
        t4 = time.perf_counter()
        label = f"{spec['name'].replace(' ', '-')}-z{stage}-{saver}"
        saver_cm = Saver(engine, saver)
        with saver_cm as ce:
            t5 = time.perf_counter()
            records, err = save_series(engine, ce, saver, n, label, rep, root, rank, args, meta)
            if err:
                saver_cm.abort()
        if err:
            import torch.distributed as dist

            dist.barrier()
            if rank == 0:  # the failed save's partial files
                for name in os.listdir(root):
                    if name.startswith(f"{label}-rep{rep}-"):
                        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if err:
            errors[saver] = err
        elif rank == 0:
            results[saver] = {"trainable_params": trainable, "build_s": t1 - t0, "init_s": t2 - t1,
                              "materialize_s": t3 - t2, "saver_setup_s": t5 - t4, "saves": records}
    maxrss = _gather(_maxrss_gb())
    for r in results.values():
        r["maxrss_gb_per_rank"] = maxrss
    engine.destroy()
    if stage == 3:
        # DeepSpeed 0.19.8's ZeRO-3 setup appends the top module to the global FWD_MODULE_STACK
        # (runtime/zero/parameter_offload.py) and nothing removes it: each ZeRO-3 engine of a
        # process would stay alive (1.4 GB per rank for AVE paper). Forget this one.
        from deepspeed.runtime.zero import parameter_offload

        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not model]
    del engine, model, optimizer, scheduler
    gc.collect()
    _malloc_trim()
    return results, errors


def _malloc_trim() -> None:
    """Hand the freed engine's heap back to the OS (glibc keeps it otherwise, and the next
    engine's peak adds to it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _where(e: BaseException) -> str:
    """The innermost DeepSpeed frame of ``e``'s traceback (and the last frame, if elsewhere)."""
    tb = traceback.extract_tb(e.__traceback__)
    short = lambda fr: f"{fr.filename.split('site-packages/')[-1]}:{fr.lineno}"  # noqa: E731
    ds = [fr for fr in tb if "site-packages/deepspeed/" in fr.filename]
    parts = [short(ds[-1])] if ds else []
    if tb and (not ds or tb[-1] is not ds[-1]):
        parts.append(short(tb[-1]))
    return f" (at {' <- '.join(reversed(parts))})" if parts else ""


def probe(spec: dict[str, Any], ds_user: dict[str, Any], rank: int, *,
          env: dict[str, str | None] | None = None) -> str:
    """Build a ZeRO-0 engine of ``spec``'s task at its ``tiny`` preset with ``ds_user`` merged into
    the config; '' when that works, else the error (every rank's, deduplicated)."""
    from avmoe.tasks import get_task
    from avmoe.train.engine import build_optimizer, deepspeed_config, initialize

    saved = {k: os.environ.get(k) for k in (env or {})}
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    err, engine = "", None
    try:
        task = get_task(spec["task"])
        model = build_model(task, task.config(preset="tiny"), "step", seed=1234)
        opt = build_optimizer(model.trainable_parameters(), "adamw", 1e-4, 0.0)
        engine, _, _ = initialize(model, opt, None, deepspeed_config(micro_batch=1, grad_accum=1, zero_stage=0,
                                                                     bf16=False, grad_clip=0.0, user=ds_user))
    except Exception as e:  # noqa: BLE001 -- the error is the result
        err = f"{type(e).__name__}: {e}".strip() + _where(e)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if engine is not None:
            if engine.checkpoint_engine.is_decoupled():
                engine.checkpoint_engine.cleanup()
            engine.destroy()
        del engine
        gc.collect()
    errs = _gather(err)
    return " | ".join(sorted(set(e for e in errs if e)))


SAVER_LABEL = {"torch": "torch.save (default)", "decoupled": "decoupled, async (python writer)"}


def worker(rank: int, args: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank: the 2 ranks share this machine's 2 cores
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": args["store"][0],
                       "MASTER_PORT": str(args["store"][1]), "TORCHELASTIC_USE_AGENT_STORE": "True"})
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD)
    import deepspeed

    deepspeed.init_distributed("gloo", dist_init_required=False)
    if rank == 0:
        _log(rank, f"process group and DeepSpeed up ({time.time() - args['t0']:.1f}s after start)")
    root = args["dir"]
    out: dict[str, Any] = {"rows": {}, "probes": {}}

    spec0 = args["presets"][0]
    probes = out["probes"]
    if args["async_stages"] and args["probe"]:
        # DeepSpeed's data-parallel writer config reads CROSS_SIZE / CROSS_RANK, which neither
        # torchrun nor Ray Train sets
        probes["decoupled python writer, CROSS_SIZE/CROSS_RANK unset"] = probe(
            spec0, DECOUPLED, rank, env={"CROSS_SIZE": None, "CROSS_RANK": None})
    os.environ.setdefault("CROSS_SIZE", "1")  # the one-node answer, for everything below
    os.environ.setdefault("CROSS_RANK", "0")
    if args["probe"]:
        probes["decoupled python writer, data_parallel unset"] = probe(spec0, DECOUPLED_DEFAULT_DP, rank)
        probes["fast (libaio) writer, data_parallel=machine"] = probe(spec0, FAST_WRITER, rank)
    if rank == 0:
        for k, v in probes.items():
            _log(rank, f"probe {k}: {v or 'works'}")

    stages = args["stages"] + [s for s in args["async_stages"] if s not in args["stages"]]
    for spec in args["presets"]:
        failed: set[int] = set()  # stages whose decoupled save failed (not tried again)
        for rep in range(args["repeats"]):
            k = rep % len(stages)
            for stage in stages[k:] + stages[:k]:  # interleaved, order rotated per repeat
                savers = ["torch"] if stage in args["stages"] else []
                if stage in args["async_stages"] and stage not in failed:
                    savers.insert(rep % 2 if savers else 0, "decoupled")  # alternate which goes first
                if not savers:
                    continue
                t0 = time.perf_counter()
                res, errs = one_engine(spec, stage, savers, rep, root, rank, args)
                for saver, err in errs.items():
                    failed.add(stage)
                    probes[f"{SAVER_LABEL[saver]}, ZeRO {stage}, {spec['name']}: save"] = err
                    if rank == 0:
                        _log(rank, f"{spec['name']} ZeRO {stage} {saver}: save failed, not tried again: {err}")
                if rank != 0:
                    continue
                for saver, r in res.items():
                    key = f"{spec['name']}|z{stage}|{saver}"
                    row = out["rows"].setdefault(key, {"preset": spec["name"], "stage": stage,
                                                       "saver": SAVER_LABEL[saver], "repeats": []})
                    row["trainable_params"] = r["trainable_params"]
                    row["repeats"].append(r)
                    s = r["saves"][-1]
                    _log(rank, f"{key} rep {rep}: save {s['save_s']:.2f}s durable {s['durable_s']:.2f}s "
                               f"bytes {s['bytes_per_rank']} (build {r['build_s']:.1f}s, init {r['init_s']:.1f}s, "
                               f"state {r['materialize_s']:.1f}s, maxrss {r['maxrss_gb_per_rank']} GB)")
                _log(rank, f"{spec['name']} ZeRO {stage} rep {rep}: {time.perf_counter() - t0:.1f}s")
        for stage in args["async_stages"]:
            if stage not in failed:
                probes[f"{SAVER_LABEL['decoupled']}, ZeRO {stage}, {spec['name']}: save"] = ""
    if rank == 0:
        order = {spec["name"]: i for i, spec in enumerate(args["presets"])}
        out["rows"] = dict(sorted(out["rows"].items(), key=lambda kv: (
            order[kv[1]["preset"]], kv[1]["stage"], kv[1]["saver"] != SAVER_LABEL["torch"])))
        with open(args["result"], "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- driver side


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}" if n / div < 100 else f"{n / div:.0f} {unit}"
    return f"{int(n)} B"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per row: bytes (repeat 0's last save; repeats differ only by the few bytes of the RNG-state
    JSON and pickled step counters: ``bytes_max_rel_diff``), the save and durable times of the
    last save of each engine (one per repeat), and the payload breakdown of repeat 0."""
    for row in result["rows"].values():
        last = [r["saves"][-1] for r in row["repeats"]]
        row["bytes_per_rank"] = last[0]["bytes_per_rank"]
        row["total_bytes"] = last[0]["total_bytes"]
        row["bytes_max_rel_diff"] = max(abs(s["total_bytes"] - row["total_bytes"]) / row["total_bytes"] for s in last)
        row["save_s"] = [s["save_s"] for s in last]
        row["durable_s"] = [s["durable_s"] for s in last]
        row["first_save_s"] = [r["saves"][0]["save_s"] for r in row["repeats"]]
        payload = [{"weights": 0, "moments": 0, "fp32_master": 0, "other": 0} for _ in range(WORLD)]
        for f in last[0]["files"]:
            for k, v in f.get("payload", {}).items():
                payload[f["rank"]][k] += v
        row["payload_per_rank"] = payload
    return result


def table(result: dict[str, Any]) -> str:
    lines = ["| preset | ZeRO | saver | trainable params | bytes per rank (rank 0 / rank 1) | total bytes "
             "| save (s), median (min–max) | until durable (s), median (min–max) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"].values():
        b = row["bytes_per_rank"]
        lines.append(f"| {row['preset']} | {row['stage']} | {row['saver']} | {_fmt_params(row['trainable_params'])} "
                     f"| {_fmt_bytes(b[0])} / {_fmt_bytes(b[1])} | {_fmt_bytes(row['total_bytes'])} "
                     f"| {_spread(row['save_s'])} | {_spread(row['durable_s'])} |")
    return "\n".join(lines)


def payload_table(result: dict[str, Any]) -> str:
    lines = ["| preset | ZeRO | saver | rank | trainable weights | optimizer moments | fp32 master partition | other |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"].values():
        for r, p in enumerate(row["payload_per_rank"]):
            lines.append(f"| {row['preset']} | {row['stage']} | {row['saver']} | {r} | {_fmt_bytes(p['weights'])} "
                         f"| {_fmt_bytes(p['moments'])} | {_fmt_bytes(p['fp32_master'])} | {_fmt_bytes(p['other'])} |")
    return "\n".join(lines)


def _parse_presets(text: str, materialize: str | None) -> list[dict[str, Any]]:
    out = []
    for item in text.split(","):
        task, _, preset = item.strip().partition(":")
        preset = preset or "paper"
        out.append({"task": task, "preset": preset, "name": f"{task} {preset}",
                    "materialize": materialize or ("step" if preset == "tiny" else "zero-grad")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=None, help=f"task:preset,... (default {PAPER_PRESETS}; --smoke: "
                                                   f"{SMOKE_PRESETS})")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--async-stages", default="0,1,2,3",
                   help="ZeRO stages also saved through DeepSpeed's decoupled (async) checkpoint engine; a stage "
                        "whose decoupled save fails is reported and not tried again ('' for none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--saves", type=int, default=1, help="torch.save saves per engine (the table shows the last; "
                        "the decoupled engine always saves at least twice: its first save of an engine "
                        "moves the state into shared memory, the second is its steady state)")
    p.add_argument("--materialize", choices=("step", "zero-grad"), default=None,
                   help="how the optimizer state is created (default: step for tiny, zero-grad otherwise)")
    p.add_argument("--no-probe", action="store_true", help="skip the construction-only probes (decoupled engine without CROSS_SIZE or "
                        "data_parallel, fast writer)")
    p.add_argument("--smoke", action="store_true", help="AVE tiny, 1 repeat, 1 save per engine, decoupled at "
                                                         "ZeRO 0 only, no probes (tests/test_bench_checkpoint.py)")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep each row's last checkpoint (its path is in --out)")
    p.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    p.add_argument("--timeout", type=float, default=1800, help="stop the workers after this many seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets = args.presets or SMOKE_PRESETS
        args.repeats, args.saves, args.no_probe = 1, 1, True
        if args.async_stages == p.get_default("async_stages"):
            args.async_stages = "0"
    presets = _parse_presets(args.presets or PAPER_PRESETS, args.materialize)
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    async_stages = [int(s) for s in args.async_stages.split(",") if s.strip()]

    t_start = time.time()
    load_start = os.getloadavg()[0]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.environ["AVMOE_CACHE_DIR"], "torch_extensions"))
    from avmoe.train.process_group import serve_store

    own_dir = args.dir is None
    root = args.dir or tempfile.mkdtemp(prefix="avmoe-bench-ckpt-")
    os.makedirs(root, exist_ok=True)
    result_path = os.path.join(root, "result-rank0.json")
    addr, port = serve_store("127.0.0.1", WORLD)
    wargs = {"presets": presets, "stages": stages, "async_stages": async_stages, "repeats": args.repeats,
             "saves": args.saves, "probe": not args.no_probe, "dir": root, "keep": args.keep,
             "store": [addr, port], "result": result_path, "t0": t_start}
    t0 = time.time()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")  # a CPU benchmark on any machine
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), json.dumps(wargs)],
                              env=env) for r in range(WORLD)]
    rc = 0
    try:
        while any(pr.poll() is None for pr in procs):
            if any(pr.poll() not in (None, 0) for pr in procs) or time.time() - t0 > args.timeout:
                rc = 1
                break
            time.sleep(0.2)
        rc = rc or max(pr.returncode for pr in procs)
    finally:
        for pr in procs:  # our own children, by handle
            if pr.poll() is None:
                pr.terminate()
                try:
                    pr.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pr.kill()
                    pr.wait()
    if rc:
        print(f"a worker failed (exit codes {[pr.returncode for pr in procs]})", file=sys.stderr)
        return 1
    with open(result_path) as f:
        result = summarize(json.load(f))
    load_end = os.getloadavg()[0]
    result["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "command": " ".join(sys.argv),
                      "wall_s": time.time() - t0, "repeats": args.repeats, "torch_saves_per_engine": args.saves,
                      "decoupled_saves_per_engine": max(2, args.saves), "presets": presets,
                      "loadavg_1min": [load_start, load_end]}
    import deepspeed  # noqa: F401 -- version only
    import torch

    result["meta"].update({"deepspeed": deepspeed.__version__, "torch": torch.__version__})
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, CPU only (CUDA hidden); DeepSpeed "
          f"{deepspeed.__version__}, torch {torch.__version__}; {WORLD} CPU ranks (gloo); repeats {args.repeats}; "
          f"load average {load_start:.1f} at start, {load_end:.1f} at end; {time.time() - t0:.0f} s\n")
    print(table(result))
    dec = [r for r in result["rows"].values() if r["saver"] == SAVER_LABEL["decoupled"]]
    if dec:
        print("\nDecoupled engine, the first save of each engine (moves every tensor into shared memory), "
              "save (s): " + "; ".join(f"{r['preset']} ZeRO {r['stage']} {_spread(r['first_save_s'])}" for r in dec))
    print("\nTensor payload per rank (repeat 0, every DeepSpeed file by the rank that wrote it):\n")
    print(payload_table(result))
    if result["probes"]:
        print("\nCheckpoint engines tried:")
        for k, v in result["probes"].items():
            print(f"- {k}: {v or 'works'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    os.remove(result_path)
    if own_dir and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), json.loads(sys.argv[3]))
        raise SystemExit(0)
    raise SystemExit(main())
