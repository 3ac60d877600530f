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
    model.load_state_dict({k: v for k, v in state.items() if k in dict(model.state_dict())}, strict=False)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avmoe.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run or checkpoint directory (path or URL)")
    p.add_argument("--video", required=True, help="the video file (any container PyAV reads, with an audio track)")
    p.add_argument("--out", default="prediction", help="output directory (default: prediction/)")
    p.add_argument("--question", help="AVQA: the question")
    p.add_argument("--question-type", help="AVQA: Type/Subtype the answer is reported under "
                                           "(e.g. Audio-Visual/Existential)")
    p.add_argument("--features", help="AVVP: the clip's R(2+1)D-18 features, a (10, 512) .npy")
    p.add_argument("--eval-drop", choices=("audio", "visual"), help="predict with that modality absent")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    args = p.parse_args(argv)
    from avmoe.ray_env import apply_loopback_env

    apply_loopback_env()
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


if __name__ == "__main__":
    raise SystemExit(main())
