"""``python -m data_pipeline`` (also installed as ``data_pipeline``)."""

from __future__ import annotations

import argparse
import logging
import sys

from data_pipeline import units
from data_pipeline.errors import DataPipelineError
from data_pipeline.schema import DEFAULT_FRAME_SIZE, DEFAULT_JPEG_QUALITY, DEFAULT_MASK_SIZE


def parse_size(text: str) -> int:
    """``--shard-size``: the API's reading (``data_pipeline.units``), as an argparse type."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.datasets import list_datasets

    datasets = list_datasets()
    p = argparse.ArgumentParser(
        prog="data_pipeline",
        description="Pack audio-visual datasets (AVE, LLP/AVVP, AVSBench S4/MS3, MUSIC-AVQA) "
                    "into WebDataset shards on any fsspec URL, and check them.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("synth", help="write a small learnable synthetic dataset in the "
                       "official raw layout",
                       description="Write a small learnable synthetic dataset in the official "
                       "raw layout of a dataset (class-coloured shapes in frames, class-pitched "
                       "tones in audio). --n videos go to train, n/4 (at least 2) to val and test.")
    s.add_argument("--task", required=True, choices=datasets)
    s.add_argument("--n", type=int, required=True, help="number of training videos")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--classes", type=int, default=4, help="how many classes appear (default 4)")
    s.add_argument("--size", type=int, default=None, help="raw frame size in pixels (default 96)")
    s.add_argument("--videos", action="store_true",
                   help="write mp4 videos (for pack --from-videos) instead of frames + waves")

    k = sub.add_parser("pack", help="official raw layout -> WebDataset shards",
                       description="Read the official raw layout of one split and write "
                       "WebDataset shards {split}-NNNNNN.tar and {split}.manifest.json to a local "
                       "path or fsspec URL (file://, s3://, gs://; S3 endpoint and credentials "
                       "from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). "
                       "Re-running an interrupted pack resumes it; shards are byte-identical to "
                       "an uninterrupted run. A split is published in one switch (its manifest, "
                       "written last, names generation-named shards): readers see the old pack "
                       "or the new one, never a mix. Two packs of one split to one --out: the "
                       "second stops with an error. gs:// needs the gcsfs package (not pinned). "
                       "See data_pipeline/SCHEMA.md.")
    k.add_argument("--dataset", required=True, choices=datasets)
    k.add_argument("--src", required=True, help="dataset root in the official raw layout")
    k.add_argument("--split", required=True, help="train, val or test")
    k.add_argument("--out", required=True, help="output directory or URL")
    k.add_argument("--workers", type=int, default=1, help="encoder processes (default 1)")
    k.add_argument("--shard-size", type=parse_size, default="256MB",
                   help="target shard size: 256MB = 256,000,000 bytes, 256MiB = 256 x 2^20, or "
                        "a byte count; the same reading as PackOptions(shard_bytes=...) "
                        "(default 256MB)")
    k.add_argument("--shard-samples", type=int, default=0,
                   help="also cap samples per shard (default: no cap)")
    k.add_argument("--frame-size", type=int, default=DEFAULT_FRAME_SIZE,
                   help=f"stored frame size, square (default {DEFAULT_FRAME_SIZE}, the model input)")
    k.add_argument("--mask-size", type=int, default=DEFAULT_MASK_SIZE,
                   help=f"stored AVSBench mask size (default {DEFAULT_MASK_SIZE})")
    k.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY)
    k.add_argument("--audio-format", choices=["npy", "flac"], default="npy",
                   help="int16 .npy (default, no decode cost) or FLAC (about 2x smaller)")
    k.add_argument("--from-videos", action="store_true",
                   help="decode 1 fps frames and 32 kHz mono audio from the original videos "
                        "(<src>/videos/<id>.mp4, or --videos-dir) with PyAV")
    k.add_argument("--videos-dir", default=None, help="where --from-videos finds the videos")
    k.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad sample: fail the split before publishing (default) or skip and "
                        "count it in the manifest")
    k.add_argument("--trust-pickle", action="store_true",
                   help="allow reading the official AVSBench AVS.npy (a pickle)")
    k.add_argument("--staging", default=None,
                   help="local staging directory (default: <out>/.staging-<split> for local "
                        "output, ~/.cache/avmoe/pack-staging/<hash> for object storage)")
    k.add_argument("--overwrite", action="store_true",
                   help="replace an existing pack of this split made from other input/options")

    v = sub.add_parser("verify", help="re-read shards with the ingest's own checks and decoder",
                       description="Re-read every shard of every split (or --split) at URL as the "
                       "streaming ingest would: the manifest's fields, each sample's sha256 and "
                       "byte span, its members decoded by the ingest's decoder (frame size, int16 "
                       "audio, masks, features, labels against the vocabularies), then each "
                       "shard's size and sha256. Exits 1 with an error naming shard, key and "
                       "member.")
    v.add_argument("url")
    v.add_argument("--split", action="append", help="only this split (repeatable)")
    v.add_argument("--no-decode", action="store_true",
                   help="check hashes, spans and member names only; decode no media")

    i = sub.add_parser("inspect", help="manifest summary; render one sample as a PNG",
                       description="Print the manifest summary of every split at URL; with "
                       "--png, render one sample (frame strip, waveform, log-mel spectrogram, "
                       "labels, mask overlay for AVSBench).")
    i.add_argument("url")
    i.add_argument("--key", default=None, help="sample key (default: the first sample)")
    i.add_argument("--split", default=None)
    i.add_argument("--png", default=None, help="write the rendering to this PNG file")

    add_plan_parser(sub)
    return p


def add_plan_parser(sub) -> None:
    """``plan``: the capacity planner (``data_pipeline.capacity``)."""
    c = sub.add_parser("plan", help="capacity plan for a GPU cluster: FLOPs, samples/s, decode "
                       "cores, ingest nodes, storage bandwidth, shards, memory, checkpoints",
                       description="For a cluster of --gpus GPUs training --task at --mfu: model "
                       "FLOPs per sample (the MFU gauge's counter, on the preset's model, cached "
                       "in the calibration file), samples/s, decode CPU cores (from plan "
                       "--calibrate's measured per-core decode rate, else a labelled default), "
                       "ingest nodes, object-storage read bandwidth (from --shards' manifest, "
                       "else an estimate), shard count and size, object-store memory per node, "
                       "checkpoint size and time per save. --explain prints every formula with "
                       "its inputs. See data_pipeline/capacity.py.")
    c.add_argument("--task", required=True, help="task or variant (ave, avvp, avs-s4, avs-ms3, "
                   "avqa, cmg-pretrain, ...)")
    c.add_argument("--preset", default="paper", help="model preset (default paper)")
    c.add_argument("--gpus", type=int, default=None, help="GPUs (training workers); required "
                   "unless only --calibrate")
    c.add_argument("--gpu", default="h100", help="device name for the bf16 peak (default h100; "
                   "a100, h200, l4, ...; AVMOE_PEAK_FLOPS overrides)")
    c.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to plan for "
                   "(default 0.4)")
    c.add_argument("--batch-size", type=int, default=None,
                   help="per-GPU batch (default: the preset's training batch)")
    c.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    c.add_argument("--gpu-node-cpus", type=int, default=192,
                   help="CPUs of a GPU node, for --decode-on trainer (default 192, p5.48xlarge)")
    c.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs a training worker holds (default 1)")
    c.add_argument("--ingest-node-cpus", type=int, default=64,
                   help="CPUs of a CPU-only ingest node (default 64: cluster/aws.yaml's "
                        "c7i.16xlarge); 0 = no ingest nodes, decode tasks share the GPU nodes")
    c.add_argument("--decode-on", choices=["ingest", "trainer"], default="ingest",
                   help="ingest (default): the decode tasks decode everything; trainer: they "
                        "leave the JPEG frames to the training workers (the ingest's "
                        "decode_on='trainer'), whose CPUs on the GPU nodes pay for them")
    c.add_argument("--decode-cpus-per-task", type=float, default=1.0,
                   help="CPUs of one decode task (default 1)")
    c.add_argument("--prefetch", type=int, default=2, help="decoded batches prefetched per "
                   "worker (default 2, IngestConfig.prefetch_batches)")
    c.add_argument("--shards", default=None, help="packed shards URL: bytes per sample and the "
                   "dataset size from {split}.manifest.json (else estimates)")
    c.add_argument("--split", default="train", help="split of --shards (default train)")
    c.add_argument("--dataset-samples", type=int, default=None,
                   help="dataset size (default: the manifest's, else the official train split)")
    c.add_argument("--shards-per-reader", type=int, default=4,
                   help="shards per decode task to aim for (default 4)")
    c.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage (default 0)")
    c.add_argument("--ckpt-bandwidth", type=parse_size, default="1GB",
                   help="storage write bandwidth per rank, bytes/s (default 1GB = 10^9 B/s)")
    c.add_argument("--decode-cpus", type=float, default=None,
                   help="also predict the data-wait fraction with this many decode CPUs")
    c.add_argument("--calibration", default=None, help="calibration file (default "
                   "~/.cache/avmoe/plan-calibration.json)")
    c.add_argument("--calibrate", action="store_true",
                   help="measure this machine's decode rate per core (the ingest's decode "
                        "function on --shards, else on generated synthetic shards) and store it")
    c.add_argument("--calibrate-seconds", type=float, default=2.0,
                   help="CPU seconds of decoding to measure (default 2)")
    c.add_argument("--calibrate-samples", type=int, default=32,
                   help="samples decoded per pass (default 32)")
    c.add_argument("--explain", action="store_true", help="print each figure's formula and inputs")
    c.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args) -> int:
    import json

    from data_pipeline import capacity

    cal_path = args.calibration or capacity.default_calibration_path()
    out: dict = {}
    if args.calibrate:
        dataset = capacity.dataset_of_task(args.task)
        key, entry = capacity.calibrate(dataset, cal_path, shards=args.shards, split=args.split,
                                        seconds=args.calibrate_seconds,
                                        max_samples=args.calibrate_samples)
        out["calibrated"] = {"key": key, **entry}
        if not args.json:
            rest = entry.get("samples_per_core_s_no_frames")
            print(f"calibrated {key}: {entry['samples_per_core_s']:.1f} samples/s per core "
                  + (f"({rest:.1f} leaving the JPEG frames to the trainer) " if rest else "")
                  + f"[{entry['samples']} samples in {entry['cpu_seconds']} CPU-s; "
                  f"{entry['source']}] -> {cal_path}")
        if args.gpus is None:
            if args.json:
                print(json.dumps(out, indent=1))
            return 0
    if args.gpus is None:
        raise capacity.PlanError("--gpus is required (or --calibrate alone)")
    inputs = capacity.PlanInputs(
        task=args.task, gpus=args.gpus, preset=args.preset, gpu=args.gpu, mfu=args.mfu,
        batch_size=args.batch_size, gpus_per_node=args.gpus_per_node,
        gpu_node_cpus=args.gpu_node_cpus, cpus_per_worker=args.cpus_per_worker,
        ingest_node_cpus=args.ingest_node_cpus, decode_on=args.decode_on,
        decode_cpus_per_task=args.decode_cpus_per_task, prefetch=args.prefetch,
        shards=args.shards, split=args.split, dataset_samples=args.dataset_samples,
        shards_per_reader=args.shards_per_reader, zero_stage=args.zero_stage,
        ckpt_bandwidth=float(args.ckpt_bandwidth), decode_cpus=args.decode_cpus,
        calibration=cal_path)
    result = capacity.plan(inputs)
    if args.json:
        print(json.dumps({**out, **result.to_dict()}, indent=1, default=str))
    else:
        print(result.render(explain=args.explain))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except DataPipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the environment (permissions, a vanished mount): named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    if args.verb == "synth":
        from data_pipeline.synth import synth

        try:
            synth(args.task, args.n, args.out, seed=args.seed, num_classes=args.classes,
                  size=args.size, videos=args.videos)
        except ValueError as e:
            raise DataPipelineError(str(e)) from None
        print(f"wrote synthetic {args.task} dataset to {args.out}")
        return 0
    if args.verb == "pack":
        from data_pipeline.pack import PackOptions, pack

        opts = PackOptions(frame_size=args.frame_size, mask_size=args.mask_size,
                           jpeg_quality=args.jpeg_quality, audio_format=args.audio_format,
                           shard_bytes=args.shard_size, shard_samples=args.shard_samples,
                           from_videos=args.from_videos, on_error=args.on_error,
                           trust_pickle=args.trust_pickle)
        res = pack(args.dataset, args.src, args.split, args.out, opts, workers=args.workers,
                   staging_dir=args.staging, overwrite=args.overwrite, videos_dir=args.videos_dir)
        m = res.manifest
        print(f"packed {m['dataset']} {m['split']}: {m['num_samples']} samples in "
              f"{m['num_shards']} shards ({m['total_bytes']:,} bytes), {m['num_skipped']} "
              f"skipped -> {args.out}")
        return 0
    if args.verb == "verify":
        from data_pipeline.verify import verify

        rep = verify(args.url, args.split, decode=not args.no_decode)
        for split, n in rep.splits.items():
            print(f"ok {split}: {n} samples")
        print(f"verified {rep.shards} shards, {rep.bytes:,} bytes")
        return 0
    if args.verb == "inspect":
        from data_pipeline.inspect_shards import render_png, summary

        print(summary(args.url))
        if args.png:
            render_png(args.url, args.png, key=args.key, split=args.split)
            print(f"wrote {args.png}")
        return 0
    if args.verb == "plan":
        return run_plan(args)
    raise AssertionError(args.verb)
