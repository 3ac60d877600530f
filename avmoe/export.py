"""Export a trained run's adapters: ``python -m avmoe.export RUN --out adapters.safetensors``.

    python -m avmoe.export ~/.local/share/avmoe/runs/ave-1 --out ave-1.safetensors
    python -m avmoe.export s3://bucket/runs/ave-1/epoch-0012-step-0003108 --out ave.safetensors

``RUN`` is a run directory (its tested = best-on-validation checkpoint; else its latest) or a
checkpoint directory, a local path or any fsspec URL. The file holds the **trainable parameters**
(adapters, router, head) and the buffers that belong with them (adapter BatchNorm statistics, a
CMG codebook and its EMA state), never the frozen backbones, which come from the preset and the
local weight files; its metadata carries the task, the model config and the run's training
config as JSON (``avmoe.task``, ``avmoe.model_config``, ``avmoe.train_config``).

ZeRO 0-2 checkpoints keep the trainable weights in one file; ZeRO-3 partitions them over the ranks
and DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32``) rebuilds them, with every
file it reads loaded ``weights_only=True`` (our allow-list of DeepSpeed's classes).

Round trip: ``model = task.build_model(cfg); load_adapters(model, path)`` (the frozen trunk
from the same preset and seed, ``model_from_export``) gives the trained model exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Iterator

import torch

FORMAT = "avmoe-adapters/1"


@contextlib.contextmanager
def local_checkpoint(path: str) -> Iterator[str]:
    """A checkpoint directory as a local directory (a remote one is copied to a temporary one)."""
    from data_pipeline import storage

    if storage.is_local(path):
        yield storage.local_path(path)
        return
    fs, base = storage.filesystem(path)
    with tempfile.TemporaryDirectory(prefix="avmoe-export-") as d:
        fs.get(base.rstrip("/") + "/", d + "/", recursive=True)
        yield d


class _SafeTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 sees it: its ``torch.load(..., weights_only=False)``
    becomes a ``weights_only=True`` load with DeepSpeed's own classes allow-listed."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **kw):
        from avmoe.train.engine import _safe_globals

        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(f, map_location=map_location, mmap=bool(mmap), weights_only=True)


def consolidated_state(ckpt_dir: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint saved of the module (trainable parameters and buffers), whole."""
    from avmoe.train.checkpoint import TAG
    from avmoe.train.engine import safe_load

    ds_dir = os.path.join(ckpt_dir, "ds")
    if zero_stage <= 2:
        states = safe_load(os.path.join(ds_dir, TAG, "mp_rank_00_model_states.pt"), map_location="cpu")
        return {k: v for k, v in states["module"].items()}
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _SafeTorch()  # never unpickle arbitrary objects
    try:
        with contextlib.redirect_stdout(sys.stderr):  # (it prints its progress)
            sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=TAG, exclude_frozen_parameters=True)
    finally:
        zero_to_fp32.torch = original
    return {k: v.contiguous() for k, v in sd.items()}


def adapter_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys an export holds: the trainable parameters, and the buffers whose nearest
    enclosing module with parameters has a trainable one (adapter BatchNorm statistics, a CMG
    codebook), not those of frozen modules (the backbones' index tables, a frozen encoder)."""
    modules = dict(model.named_modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    keys = list(trainable)
    has_trainable: dict[str, bool] = {}
    persistent = set(model.state_dict(keep_vars=True))  # (running statistics of a router are not)
    for name, _ in model.named_buffers():
        if name not in persistent:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        while True:
            params = list(modules[owner].parameters())
            if params or owner == "":
                break
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        if owner not in has_trainable:
            has_trainable[owner] = any(p.requires_grad for p in modules[owner].parameters())
        if has_trainable[owner] and owner != "":
            keys.append(name)
    return keys


def model_from_config(train_config: dict[str, Any], device: str | torch.device = "cpu"):
    """(task, model config, model) rebuilt as the trainer built it: the run's preset and model
    overrides, the frozen weights drawn with the run's seed (random-init backbones) or read from
    its local weight files."""
    from avmoe.train.config import TrainConfig
    from avmoe.train.trainer import seed_all

    tcfg = TrainConfig.from_dict(train_config)
    task, cfg = tcfg.get_task(), tcfg.task_config()
    seed_all(int(tcfg.resolved_optim().seed))  # as the trainer does before build_model
    with torch.device(device):
        model = task.build_model(cfg)
    return task, cfg, model


def export(path: str, out: str, official_keys: bool = False) -> dict[str, Any]:
    """Write the adapters of run or checkpoint ``path`` to ``out`` (.safetensors); returns a summary.
    ``official_keys``: named and shaped as the official AVMoE AVE code's ``MMIL_Net`` state dict
    (``avmoe.official_keys``; AVE with MoE adapters only), to load with ``strict=False`` there."""
    from safetensors.torch import save_file

    from avmoe.train.checkpoint import resolve

    ckpt, meta = resolve(path)
    m = meta["meta"]
    stage = int(m.get("zero_stage") or 0)
    _, cfg, model = model_from_config(m["config"], device="meta")
    keys = adapter_keys(model)
    with local_checkpoint(ckpt) as d:
        state = consolidated_state(d, stage)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{ckpt}: the checkpoint lacks {len(missing)} trainable tensors of its model, e.g. "
                         f"{missing[:3]} (is it an avmoe checkpoint of this code version?)")
    tensors = {k: state[k].detach().cpu().contiguous() for k in keys}
    if official_keys:
        from avmoe.official_keys import to_official

        if cfg.task != "ave" or cfg.adapter.kind != "moe":
            raise ValueError(f"--official-keys maps the AVE model with MoE adapters (the official AVMoE AVE code); "
                             f"this checkpoint is {cfg.task} with {cfg.adapter.kind!r} adapters")
        tensors = to_official(tensors, cfg.adapter.num_cma)
    import dataclasses

    metadata = {"format": FORMAT, "avmoe.task": m.get("task", ""), "avmoe.checkpoint": ckpt,
                "avmoe.keys": "official" if official_keys else "avmoe",
                "avmoe.zero_stage": str(stage),
                "avmoe.model_config": json.dumps(dataclasses.asdict(cfg), default=str),
                "avmoe.train_config": json.dumps(m["config"], default=str)}
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp = out + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, out)  # never a half-written file under the final name
    n = sum(t.numel() for t in tensors.values())
    return {"checkpoint": ckpt, "task": m.get("task"), "zero_stage": stage, "tensors": len(tensors),
            "parameters": n, "bytes": os.path.getsize(out), "out": out}


def read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an avmoe adapter export (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return meta


def load_adapters(model: torch.nn.Module, path: str, strict: bool = True) -> dict[str, str]:
    """Load an export into ``model`` (built by ``task.build_model`` of the same config); returns
    its metadata. ``strict``: every trainable parameter of the model must be in the file and
    every tensor of the file in the model, with its shape."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if meta.get("avmoe.keys", "avmoe") != "avmoe":
        raise ValueError(f"{path} has the official AVMoE key names (--official-keys): load it into the official "
                         f"code, or convert it back with avmoe.official_keys.convert_official")
    sd = load_file(path, device=str(next(model.parameters()).device))
    own = dict(model.state_dict())
    wrong = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path}: shapes differ from this model for {wrong[:3]} (e.g. {tuple(sd[wrong[0]].shape)} "
                         f"vs {tuple(own[wrong[0]].shape)}): build the model with the export's model config")
    result = model.load_state_dict(sd, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if strict and (missing or result.unexpected_keys):
        raise ValueError(f"{path} does not fit this model: missing trainable {missing[:5]}, unexpected "
                         f"{sorted(result.unexpected_keys)[:5]} (task {meta.get('avmoe.task')!r})")
    return meta


def model_from_export(path: str, device: str | torch.device = "cpu"):
    """(task, model config, model with the exported adapters) from an export alone (its training
    config rebuilds the frozen trunk: same preset, weight files and seed)."""
    meta = read_metadata(path)
    task, cfg, model = model_from_config(json.loads(meta["avmoe.train_config"]), device=device)
    load_adapters(model, path)
    return task, cfg, model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avmoe.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (its best checkpoint) or a checkpoint directory; path or URL")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--official-keys", action="store_true",
                   help="name and shape the tensors as the official AVMoE AVE code does (AVE, MoE adapters; "
                        "load with strict=False into its MMIL_Net: the backbones are not in the file)")
    args = p.parse_args(argv)
    from avmoe.ray_env import apply_loopback_env

    apply_loopback_env()
    try:
        s = export(args.run, args.out, official_keys=args.official_keys)
    except (FileNotFoundError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {s['tensors']} tensors ({s['parameters'] / 1e6:.3f} M values, {s['bytes'] / 1e6:.1f} MB) of "
          f"{s['task']} from {s['checkpoint']} (ZeRO {s['zero_stage']}) to {s['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
