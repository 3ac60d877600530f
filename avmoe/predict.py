"""Apply a trained model to a video of your own: ``python -m avmoe.predict``.

    python -m avmoe.predict --checkpoint ~/.local/share/avmoe/runs/ave-1 --video clip.mp4
    python -m avmoe.predict --checkpoint RUN --video clip.mp4 --question "Is the violin playing?" \\
        --question-type Audio-Visual/Existential                   # AVQA
    python -m avmoe.predict --checkpoint RUN --video clip.mp4 --features r2p1d.npy   # AVVP (optional)
    python -m avmoe.predict --checkpoint RUN --video clip.mp4 --eval-drop audio --out pred/

``--checkpoint`` is a run directory (the checkpoint its test was run with: its best on
validation) or a checkpoint directory, a local path or any fsspec URL; the run's shards (their
manifest: frame size, JPEG quality, vocabularies) must be readable, as they were for training.
The video goes through the packer's ``--from-videos`` path and the ingest's decoder
(``data_pipeline.inference``): the model sees it as it saw its test split. Written to ``--out``
(default ``prediction/``): ``prediction.json`` (the task's own record: AVE per-second events with
class names and confidence; AVVP audio and visual event tracks; AVS per-frame mask coverage +
``masks.npy``; AVQA the answer and its top 5) and the task's picture (``prediction.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch


class PredictError(ValueError):
    """A prediction request that cannot be served; the message says why and what to do."""


def load_model(checkpoint: str, device: str = "cpu"):
    """(task, model config, eval-mode model with the checkpoint's weights, the checkpoint's meta)
    for a run or checkpoint directory (ZeRO 0-3)."""
    from avmoe.export import adapter_keys, consolidated_state, local_checkpoint, model_from_config
    from avmoe.train.checkpoint import resolve

    try:
        ckpt, meta = resolve(checkpoint)
    except FileNotFoundError as e:
        raise PredictError(f"--checkpoint: {e}") from None
    m = meta["meta"]
    task, cfg, model = model_from_config(m["config"], device=device)
    with local_checkpoint(ckpt) as d:
        state = consolidated_state(d, int(m.get("zero_stage") or 0))
    missing = [k for k in adapter_keys(model) if k not in state]
    if missing:
        raise PredictError(f"--checkpoint: {ckpt} lacks trainable tensors of its model, e.g. {missing[:3]}")
    own = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return task, cfg, model.eval(), {"checkpoint": ckpt, **m}


def run_manifest(meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the run's test split (the packing options and vocabularies the model
    was trained with)."""
    from avmoe.train.config import TrainConfig
    from data_pipeline.manifest import load_manifest

    tcfg = TrainConfig.from_dict(meta["config"])
    split = tcfg.paths.test_split
    url = tcfg.paths.url(split)
    try:
        return load_manifest(url, split)
    except Exception as e:
        raise PredictError(f"the run's shards at {url} ({split} manifest) are needed for the packing options and "
                           f"label vocabularies the model was trained with: {e}") from None


def predict_video(checkpoint: str, video: str, out_dir: str, *, eval_drop: str | None = None,
                  device: str = "cpu", **inputs) -> dict[str, Any]:
    """Predict on one video; writes prediction.json and the task's picture into ``out_dir`` and
    returns the record. ``inputs``: ``question`` / ``question_type`` (AVQA), ``features`` (AVVP)."""
    from data_pipeline.errors import SampleError
    from data_pipeline.inference import sample_from_video

    task, cfg, model, meta = load_model(checkpoint, device)
    if inputs.get("question") and task.name != "avqa":
        raise PredictError(f"--question is for an AVQA model; {meta['checkpoint']} is a {task.full_name} model")
    if inputs.get("features") is not None and task.name != "avvp":
        raise PredictError(f"--features is for an AVVP model; {meta['checkpoint']} is a {task.full_name} model")
    manifest = run_manifest(meta)
    try:
        batch = sample_from_video(video, manifest, **{k: v for k, v in inputs.items() if v is not None})
    except SampleError as e:
        raise PredictError(f"--video: {e}") from None
    except (NotImplementedError, ValueError) as e:
        raise PredictError(str(e)) from None
    if eval_drop:
        batch = batch.drop(eval_drop)
    with torch.no_grad():
        out = model(batch.to(device))
    preds = task.predict(out, batch)
    record = task.prediction_record(preds, cfg, manifest.get("label_vocab") or {})
    record = {"task": task.full_name, "video": video, "checkpoint": meta["checkpoint"],
              **({"eval_drop": eval_drop} if eval_drop else {}),
              **({"question": inputs["question"], "question_type": batch.targets["question_type"].tolist()[0]}
                 if inputs.get("question") else {}),
              **({"note": "no --features: the model's R(2+1)D stream saw zeros"}
                 if task.name == "avvp" and inputs.get("features") is None else {}),
              **record}
    if "question_type" in record:
        from data_pipeline.datasets.avqa import QUESTION_TYPES

        record["question_type"] = "/".join(QUESTION_TYPES[record["question_type"]])
    os.makedirs(out_dir, exist_ok=True)
    title = f"{os.path.basename(video)} · {task.full_name} · {os.path.basename(meta['checkpoint'])}"
    files = task.plot_prediction(record, batch.frames[0].numpy(), out_dir, title)
    record["files"] = [os.path.basename(f) for f in files]
    with open(os.path.join(out_dir, "prediction.json"), "w") as f:
        json.dump({k: v for k, v in record.items() if not k.startswith("_")}, f, indent=1)
    return record


# --------------------------------------------------------------------------- batch inference


class Predictor:
    """The Ray Data actor of batch inference: holds the model (one per actor; one GPU each with
    ``--gpus-per-actor 1``), takes the ingest's decoded blocks (one plan batch each) and returns
    per-sample predictions and the split's targets as tensor columns."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        torch.set_num_threads(1)
        if device == "cuda":
            device = "cuda:0"  # (the GPU Ray gave this actor)
        self.device = device
        self.task, self.cfg, self.model, _ = load_model(checkpoint, device)

    def __call__(self, cols: dict) -> dict:
        import numpy as np

        from data_pipeline.sample import OK, to_avbatch

        ok = np.asarray(cols[OK], dtype=bool)
        batch = to_avbatch(cols, None if ok.all() else ok, {})
        n = batch.batch_size
        with torch.no_grad():
            out = self.model(batch.to(self.device))
        preds = self.task.predict(out, batch)
        res = {"key": np.array(batch.keys, dtype=object), "skipped": np.full(n, int((~ok).sum()))}
        for prefix, d in (("pred.", preds), ("target.", batch.targets)):
            for k, v in d.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                    res[prefix + k] = v.detach().cpu().numpy()
        return res


def _write_part(rows: dict, url: str) -> None:
    """One output part as parquet: each tensor column flattened to a list per sample, its
    per-sample shape and dtype in the schema metadata; written under a temporary name, then moved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline import storage

    arrays, shapes = {}, {}
    for k, v in rows.items():
        if v.dtype == object:
            arrays[k] = pa.array([str(x) for x in v])
        else:
            shapes[k] = {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
            flat = v.reshape(len(v), -1)
            arrays[k] = pa.array(list(flat)) if flat.shape[1] != 1 else pa.array(flat[:, 0])
    table = pa.table(arrays).replace_schema_metadata({"avmoe.shapes": json.dumps(shapes)})
    fs, path = storage.filesystem(url)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def read_predictions(out: str) -> dict:
    """Every part of a batch-inference output, concatenated in part order: {column: array}, the
    tensor columns back in their per-sample shapes."""
    import numpy as np
    import pyarrow.parquet as pq

    from data_pipeline import storage

    fs, base = storage.filesystem(out)
    parts = sorted(p for p in fs.ls(base, detail=False) if p.endswith(".parquet"))
    cols: dict[str, list] = {}
    for p in parts:
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        shapes = json.loads((t.schema.metadata or {}).get(b"avmoe.shapes", b"{}"))
        for name in t.column_names:
            v = t.column(name).to_pylist()
            if name in shapes:
                arr = np.asarray(v, dtype=shapes[name]["dtype"]).reshape(len(v), *shapes[name]["shape"])
            else:
                arr = np.asarray(v, dtype=object)
            cols.setdefault(name, []).append(arr)
    return {k: np.concatenate(v) for k, v in cols.items()}


def predict_shards(checkpoint: str, shards: str, split: str, out: str, *, actors: int = 2,
                   gpus_per_actor: float = 0.0, batch_size: int = 8, parts: int | None = None,
                   decode_cpus: float = 1.0, log=print) -> dict[str, Any]:
    """Batch inference over a packed split, Ray Data's canonical shape: the ingest's CPU decode
    tasks feed ``map_batches`` over an actor pool of ``actors`` models. The split is cut into
    ``parts`` (the ingest's dealing of batches over that many "ranks": every sample in exactly
    one part), each written as ``part-NNNNN.parquet`` under ``out``; a part already there is
    skipped, so an interrupted run continues where it stopped. Returns counts and throughput."""
    import math
    import time

    import numpy as np
    import ray

    from avmoe.train.checkpoint import resolve
    from data_pipeline import storage
    from data_pipeline.ingest import IngestConfig, ShardStream
    from data_pipeline.manifest import load_manifest

    try:
        ckpt, meta = resolve(checkpoint)
    except FileNotFoundError as e:
        raise PredictError(f"--checkpoint: {e}") from None
    from avmoe.train.config import TrainConfig

    tcfg = TrainConfig.from_dict(meta["meta"]["config"])
    task = tcfg.get_task()
    manifest = load_manifest(shards, split)
    wanted = task.split_datasets(tcfg.task_config())["eval"]
    if manifest["dataset"] != wanted:
        raise PredictError(f"--shards: {shards} holds {manifest['dataset']!r} data; the {task.full_name} model of "
                           f"{ckpt} predicts on {wanted!r}")
    n = int(manifest["num_samples"])
    parts = parts or max(1, math.ceil(n / 512))
    fs, base = storage.filesystem(out)
    fs.makedirs(base, exist_ok=True)
    device = "cuda" if gpus_per_actor else "cpu"
    done, t0, samples = 0, time.perf_counter(), 0
    for p in range(parts):
        url = storage.join(out, f"part-{p:05d}.parquet")
        if fs.exists(storage.join(base, f"part-{p:05d}.parquet")):
            done += 1
            continue
        # one plan batch per decode task (shuffle_buffer = one global batch): as many inputs as
        # batches, so every actor of the pool gets work
        stream = ShardStream(IngestConfig(url=shards, split=split, batch_size=batch_size, shuffle=False,
                                          shuffle_buffer=batch_size * parts, drop_last=False, on_error="skip",
                                          decode_resources={"CPU": decode_cpus}), rank=p, world_size=parts)
        ds = stream.ray_dataset(0).map_batches(
            Predictor, fn_constructor_kwargs={"checkpoint": ckpt, "device": device}, batch_size=None,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor or None, num_cpus=1)
        chunks: dict[str, list] = {}
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k, v in b.items():
                chunks.setdefault(k, []).append(v)
        if not chunks:  # a part the dealing left empty (fewer batches than parts): written empty
            chunks = {"key": [np.array([], dtype=object)]}
        rows = {k: np.concatenate(v) for k, v in chunks.items()}
        _write_part(rows, url)
        samples += len(rows["key"])
        log(f"[predict] part {p + 1}/{parts}: {len(rows['key'])} samples -> {url}")
    seconds = time.perf_counter() - t0
    rate = samples / seconds if seconds > 0 and samples else 0.0
    log(f"[predict] {samples} samples in {seconds:.1f} s ({rate:.1f} samples/s, {actors} actors"
        + (f", {gpus_per_actor} GPU each" if gpus_per_actor else ", CPU") + f"); {done} parts were already there")
    return {"samples": samples, "seconds": seconds, "samples_per_second": rate, "parts": parts,
            "parts_skipped": done, "checkpoint": ckpt, "task": task.full_name}


def evaluate_predictions(out: str, checkpoint: str, shards: str, split: str) -> dict[str, float]:
    """The task's exact metric over a batch-inference output (samples in the split's manifest
    order, as the trainer's evaluation feeds it)."""
    from avmoe.export import model_from_config
    from avmoe.train.checkpoint import resolve
    from data_pipeline.batch import AVBatch
    from data_pipeline.manifest import load_manifest

    _, meta = resolve(checkpoint)
    task, cfg, _ = model_from_config(meta["meta"]["config"], device="meta")
    rows = read_predictions(out)
    manifest = load_manifest(shards, split)
    order = {k: i for i, k in enumerate(k for s in manifest["shards"] for k in s["keys"])}
    acc = task.metric_accumulator(cfg)
    for i in sorted(range(len(rows["key"])), key=lambda i: order.get(str(rows["key"][i]), len(order))):
        preds = {k[5:]: torch.from_numpy(v[i:i + 1]) for k, v in rows.items() if k.startswith("pred.")}
        targets = {k[7:]: torch.from_numpy(v[i:i + 1]) for k, v in rows.items() if k.startswith("target.")}
        acc.update(preds, AVBatch(frames=None, audio=None, targets=targets, keys=[str(rows["key"][i])]))
    return {k: float(v) for k, v in acc.compute().items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avmoe.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run or checkpoint directory (path or URL)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="the video file (any container PyAV reads, with an audio track)")
    src.add_argument("--shards", help="batch inference: a shard URL (packed split) instead of a video")
    p.add_argument("--split", default="test", help="--shards: the split (default: test)")
    p.add_argument("--out", default=None, help="output directory (default: prediction/; --shards: "
                                               "predictions.parquet/ beside nothing, give a URL)")
    p.add_argument("--actors", type=int, default=2, help="--shards: model replicas (Ray actors; default 2)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="--shards: GPUs per actor (default 0: CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="--shards: samples per model call (default 8)")
    p.add_argument("--parts", type=int, default=None, help="--shards: output parts (default: one per 512 samples)")
    p.add_argument("--evaluate", action="store_true", help="--shards: also compute the task's metric on the output")
    p.add_argument("--question", help="AVQA: the question")
    p.add_argument("--question-type", help="AVQA: Type/Subtype the answer is reported under "
                                           "(e.g. Audio-Visual/Existential)")
    p.add_argument("--features", help="AVVP: the clip's R(2+1)D-18 features, a (10, 512) .npy")
    p.add_argument("--eval-drop", choices=("audio", "visual"), help="predict with that modality absent")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    args = p.parse_args(argv)
    from avmoe.ray_env import apply_loopback_env

    apply_loopback_env()
    if args.shards:
        return _main_shards(args)
    args.out = args.out or "prediction"
    try:
        record = predict_video(args.checkpoint, args.video, args.out, eval_drop=args.eval_drop, device=args.device,
                               question=args.question, question_type=args.question_type, features=args.features)
    except (PredictError, ValueError, FileNotFoundError) as e:
        print(f"predict error: {e}", file=sys.stderr)
        return 2
    summary = {k: record[k] for k in ("video_class", "answer") if k in record}
    print(f"[predict] {record['task']} on {args.video}: " + (json.dumps(summary) if summary else "done") +
          f"; {os.path.join(args.out, 'prediction.json')} + {', '.join(record['files'])}")
    return 0


def _main_shards(args) -> int:
    import logging

    import ray

    from avmoe.console import job_runtime_env, quiet_process, verbose
    from avmoe.ray_env import init_local_ray, on_cluster

    out = args.out or "predictions.parquet"
    quiet_process()
    quiet = {} if verbose() else {"logging_level": logging.WARNING}
    if not ray.is_initialized():
        if on_cluster():
            ray.init(address="auto", runtime_env=job_runtime_env(), **quiet)
        else:
            init_local_ray(num_cpus=max(os.cpu_count() or 1, args.actors + 1), runtime_env=job_runtime_env(), **quiet)
        quiet_process()
    try:
        summary = predict_shards(args.checkpoint, args.shards, args.split, out, actors=args.actors,
                                 gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, parts=args.parts)
        if args.evaluate:
            metrics = evaluate_predictions(out, args.checkpoint, args.shards, args.split)
            print("[predict] " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    except (PredictError, ValueError, FileNotFoundError) as e:
        print(f"predict error: {e}", file=sys.stderr)
        return 2
    print(f"[predict] {summary['task']}: {summary['samples_per_second']:.1f} samples/s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
