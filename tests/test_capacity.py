"""The capacity planner (``python -m data_pipeline plan``, ``data_pipeline/capacity.py``): its
figures follow from their formulas on a real packed split, its FLOPs are the MFU gauge's
counter on a real decoded batch, ``--calibrate`` measures the ingest's decode function and
``plan`` then uses it, its checkpoint size matches a real DeepSpeed save, and bad input is a
named error."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, free_port  # noqa: E402

from data_pipeline import capacity  # noqa: E402
from data_pipeline.cli import main  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402

FRAME = 64  # a small frame size keeps the tiny model's FLOP count and the decode cheap


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """8 synthetic AVE videos packed by the real packer into 3 shards (frame size 64)."""
    from data_pipeline.pack import PackOptions, pack
    from data_pipeline.synth import synth

    root = tmp_path_factory.mktemp("capacity")
    synth("ave", 8, str(root / "raw"), seed=1, size=48)
    pack("ave", str(root / "raw"), "train", str(root / "shards"),
         PackOptions(frame_size=FRAME, shard_samples=3), progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """One calibration file shared by the tests that only need the (cached) model figures."""
    return str(tmp_path_factory.mktemp("cal") / "model-cache.json")


def plan_json(capsys, *args) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def val(p: dict, key: str):
    return p["figures"][key]["value"]


def test_figures_follow_their_formulas(packed, model_cache, capsys, monkeypatch):
    monkeypatch.delenv("AVMOE_PEAK_FLOPS", raising=False)
    common = ["--task", "ave", "--preset", "tiny", "--shards", packed, "--gpu", "a100",
              "--mfu", "0.3", "--batch-size", "4", "--calibration", model_cache]
    p4 = plan_json(capsys, *common, "--gpus", "4")
    p8 = plan_json(capsys, *common, "--gpus", "8")
    m = load_manifest(packed, "train")
    F = val(p4, "flops_per_sample")
    assert val(p4, "gpu_peak_flops") == 312e12
    r = 0.3 * 312e12 / F
    assert val(p4, "samples_per_s_per_gpu") == pytest.approx(r, rel=1e-12)
    assert val(p4, "samples_per_s") == pytest.approx(4 * r, rel=1e-12)
    assert val(p4, "step_time_s") == pytest.approx(4 / r, rel=1e-12)
    # doubling the GPUs doubles samples/s and the decode work, not the per-GPU figures
    assert val(p8, "samples_per_s") == pytest.approx(2 * val(p4, "samples_per_s"), rel=1e-12)
    exact4 = p4["figures"]["decode_cores"]["inputs"]["exact"]
    exact8 = p8["figures"]["decode_cores"]["inputs"]["exact"]
    assert exact8 == pytest.approx(2 * exact4, rel=1e-12)
    c = val(p4, "decode_rate_per_core")
    assert exact4 == pytest.approx(4 * r / c, rel=1e-12)
    assert val(p4, "decode_cores") == math.ceil(exact4)
    assert val(p8, "decode_cores") == math.ceil(exact8)
    assert val(p4, "ingest_nodes") == math.ceil(val(p4, "decode_cores") / 64)
    assert val(p8, "step_time_s") == pytest.approx(val(p4, "step_time_s"), rel=1e-12)
    # storage: the manifest's bytes per sample of the real packed shards
    b = sum(s["bytes"] for s in m["shards"]) / m["num_samples"]
    assert val(p4, "bytes_per_sample") == b
    assert val(p4, "read_bandwidth") == pytest.approx(4 * r * b, rel=1e-12)
    assert val(p8, "read_bandwidth") == pytest.approx(2 * val(p4, "read_bandwidth"), rel=1e-12)
    assert val(p4, "dataset_samples") == m["num_samples"] == 8
    assert val(p4, "dataset_bytes") == pytest.approx(8 * b)
    assert val(p4, "shard_count") == 1 and val(p4, "shard_bytes") == pytest.approx(8 * b)
    # decoded batch: 4 x (10 frames 64x64x3 uint8 + 10 s int16 audio at 32 kHz + 10 int64
    # segment labels + the ok flag), independently of the planner's own shape code
    per_sample = 10 * FRAME * FRAME * 3 + 10 * 32000 * 2 + 10 * 8 + 1
    assert val(p4, "decoded_batch_bytes") == 4 * per_sample
    assert val(p4, "object_store_trainer_node") == 4 * per_sample * 2 * 4  # prefetch 2, 4 workers
    assert val(p8, "object_store_trainer_node") == 4 * per_sample * 2 * 8
    assert val(p4, "object_store_ingest_node") == 4 * per_sample * 64
    ck = val(p4, "checkpoint_bytes")
    assert val(p4, "checkpoint_save_s") == pytest.approx(ck / 1e9)
    # no ingest nodes: the decode tasks share the GPU nodes' CPUs
    pg = plan_json(capsys, *common, "--gpus", "16", "--ingest-node-cpus", "0")
    assert val(pg, "ingest_nodes") == 0 and "object_store_ingest_node" not in pg["figures"]
    assert val(pg, "data_cores_per_gpu_node") == pytest.approx(val(pg, "decode_cores") / 2)
    # JPEG frames decoded by the training workers: the decode tasks run at the no-frames rate,
    # the workers pay the difference, and the blocks carry the JPEG bytes instead of the frames
    pt = plan_json(capsys, *common, "--gpus", "4", "--decode-on", "trainer")
    cr = val(pt, "decode_rate_per_core_no_frames")
    assert cr > c == val(pt, "decode_rate_per_core")
    assert val(pt, "decode_cores") == math.ceil(4 * r / cr - 1e-9)
    assert val(pt, "frame_decode_cores_per_worker") == pytest.approx(r * (1 / c - 1 / cr))
    with tarfile.open(os.path.join(packed, m["shards"][0]["name"])) as tf:
        jpeg = sum(t.size for t in tf.getmembers() if t.name.endswith(".jpg")) / 3
    assert val(pt, "decoded_batch_bytes") == pytest.approx(
        4 * (per_sample - 10 * FRAME * FRAME * 3 + jpeg + 8 * 11 + 1))
    # a given decode provision: the predicted data wait
    pw = plan_json(capsys, *common, "--gpus", "4", "--decode-cpus", "1")
    assert val(pw, "predicted_data_wait") == pytest.approx(
        capacity.predict_data_wait(c, 1, 4 / r, 4, 4))


@pytest.mark.parametrize("batch", [2, 4])
def test_flops_are_the_mfu_gauges_count_on_a_real_batch(packed, model_cache, capsys, batch):
    """The trainer's gauge: flops_per_sample over the model built from the manifest's model
    keys, on a batch decoded by the ingest's decode function from the packed shards."""
    import torch

    from avmoe.tasks import get_task
    from avmoe.telemetry.flops import flops_per_sample
    from data_pipeline.datasets import get_dataset
    from data_pipeline.decode_task import decode_task
    from data_pipeline.sample import SampleSpec, to_avbatch

    m = load_manifest(packed, "train")
    ds = get_dataset("ave")
    spec = SampleSpec.from_manifest(m, ds)
    sh = m["shards"][0]
    items = [[i, sh["name"], k, o, n, h] for i, (k, (o, n), h) in
             enumerate(zip(sh["keys"], sh["spans"], sh["sample_sha256"]))]
    items += [[3 + i, m["shards"][1]["name"], k, o, n, h] for i, (k, (o, n), h) in
              enumerate(zip(m["shards"][1]["keys"], m["shards"][1]["spans"],
                            m["shards"][1]["sample_sha256"]))]
    cols = next(decode_task({"spec": [json.dumps({"batches": [items[:batch]]})]}, packed,
                            spec.to_dict(), {}, 0, ds))
    real = to_avbatch(cols, None, {})
    assert tuple(real.frames.shape) == (batch, 10, FRAME, FRAME, 3)
    task = get_task("ave")
    cfg = task.config(preset="tiny", **task.model_keys(m))
    torch.manual_seed(0)
    model = task.build_model(cfg)
    model.train()
    gauge = flops_per_sample(model, lambda mm, x: task.loss(mm(x), x, cfg)[0], real)
    p = plan_json(capsys, "--task", "ave", "--preset", "tiny", "--shards", packed, "--gpus", "1",
                  "--batch-size", str(batch), "--calibration", model_cache)
    assert val(p, "flops_per_sample") == gauge


def test_calibrate_writes_the_file_and_plan_uses_it(packed, model_cache, tmp_path, capsys):
    cal = tmp_path / "cal.json"
    if os.path.exists(model_cache):  # the model figures only (no decode rate yet): saves a count
        cal.write_text(json.dumps({**json.loads(Path(model_cache).read_text()), "decode": {}}))
    args = ["--task", "ave", "--preset", "tiny", "--shards", packed, "--calibration", str(cal)]
    # no calibration yet: the default, labelled as such
    assert main(["plan", *args, "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"decode rate per core .*DEFAULT, not measured here", text)
    assert "run `python -m data_pipeline plan --calibrate --task ave`" in text
    before = plan_json(capsys, *args, "--gpus", "2")
    assert before["figures"]["decode_rate_per_core"]["basis"].startswith("DEFAULT")
    # measure the ingest's decode function on the packed shards
    assert main(["plan", "--calibrate", *args, "--calibrate-seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"calibrated ave/{FRAME}px/npy: ") and str(cal) in out
    stored = json.loads(cal.read_text())
    entry = stored["decode"][f"ave/{FRAME}px/npy"]
    assert entry["samples_per_core_s"] > 0 and entry["samples"] >= 16  # >= 2 passes of 8
    assert entry["function"] == "data_pipeline.decode_task.decode_task"
    assert entry["bytes_per_sample"] == pytest.approx(val(before, "bytes_per_sample"))
    if capacity._supports_frames_flag():  # the ingest can leave the frames to the trainer
        assert entry["samples_per_core_s_no_frames"] > entry["samples_per_core_s"]
        pt = plan_json(capsys, *args, "--gpus", "2", "--decode-on", "trainer")
        assert val(pt, "decode_rate_per_core_no_frames") == entry["samples_per_core_s_no_frames"]
    after = plan_json(capsys, *args, "--gpus", "2")
    assert val(after, "decode_rate_per_core") == entry["samples_per_core_s"]
    assert after["figures"]["decode_rate_per_core"]["basis"].startswith("calibrated")
    assert val(after, "decode_cores") == math.ceil(
        val(after, "samples_per_s") / entry["samples_per_core_s"] - 1e-9)
    assert not any("default" in n for n in after["notes"])
    # the model figures were cached in the same file: a plan no longer builds the model
    assert stored["model"] and all("flops_marginal" in v for v in stored["model"].values())
    assert after["figures"]["flops_per_sample"]["basis"].endswith("(cached in the calibration file)")


def test_calibrate_on_generated_shards(tmp_path, capsys):
    """Without --shards, --calibrate packs synthetic shards at the default options (192 px)."""
    cal = tmp_path / "cal.json"
    out = plan_json(capsys, "--task", "ave", "--calibrate", "--calibration", str(cal),
                    "--calibrate-seconds", "0.2", "--calibrate-samples", "8")
    assert out["calibrated"]["key"] == "ave/192px/npy"
    assert out["calibrated"]["source"].startswith("synthetic shards")
    assert json.loads(cal.read_text())["decode"]["ave/192px/npy"]["samples_per_core_s"] > 0


def test_cached_model_figures_are_reused(packed, model_cache, capsys, monkeypatch):
    args = ["--task", "ave", "--preset", "tiny", "--shards", packed, "--gpus", "1",
            "--calibration", model_cache]
    first = plan_json(capsys, *args)
    import avmoe.capacity_model as cm

    def boom(*a, **k):
        raise AssertionError("model rebuilt despite the cache")

    monkeypatch.setattr(cm, "model_figures", boom)
    again = plan_json(capsys, *args)
    assert val(again, "flops_per_sample") == val(first, "flops_per_sample")


@pytest.mark.parametrize("args, message", [
    (["--task", "nope", "--gpus", "8"], "unknown task 'nope'; known: ave"),
    (["--task", "ave", "--gpus", "0"], "--gpus must be an integer >= 1, got 0"),
    (["--task", "ave", "--gpus", "8", "--gpu", "tpu9"], "--gpu 'tpu9': unknown device"),
    (["--task", "ave", "--gpus", "8", "--mfu", "1.5"], "--mfu must be in (0, 1], got 1.5"),
    (["--task", "ave", "--preset", "huge", "--gpus", "8"], "unknown preset 'huge'"),
    (["--task", "ave"], "--gpus is required"),
])
def test_bad_input_is_a_named_error(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AVMOE_PEAK_FLOPS", raising=False)
    preset = [] if "--preset" in args else ["--preset", "tiny"]
    rc = main(["plan", *preset, *args, "--calibration", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and message in err, err


def test_shards_without_manifest_and_other_dataset(tmp_path, packed, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["plan", "--task", "ave", "--preset", "tiny", "--gpus", "8", "--shards",
               str(tmp_path / "empty"), "--calibration", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "no manifest train.manifest.json" in err
    rc = main(["plan", "--task", "avvp", "--preset", "tiny", "--gpus", "8", "--shards", packed,
               "--calibration", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "is dataset 'ave', but task 'avvp' trains on 'avvp'" in err
    (tmp_path / "bad.json").write_text("{not json")
    rc = main(["plan", "--task", "ave", "--gpus", "8", "--calibration", str(tmp_path / "bad.json")])
    assert rc == 1 and f"calibration file {tmp_path / 'bad.json'}: cannot be read" in capsys.readouterr().err


def test_without_avmoe_the_error_says_so(tmp_path, capsys, monkeypatch):
    real = capacity.importlib.import_module

    def no_avmoe(name, *a, **k):
        if name.startswith("avmoe"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(capacity.importlib, "import_module", no_avmoe)
    rc = main(["plan", "--task", "ave", "--gpus", "8", "--calibration", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "the planner needs the avmoe package" in err


def test_text_table_and_explain(model_cache, capsys):
    """Without --shards: the estimate and the nominal dataset size are labelled; --explain
    prints every figure's formula and inputs."""
    assert main(["plan", "--task", "ave", "--preset", "tiny", "--gpus", "256", "--explain",
                 "--calibration", model_cache]) == 0
    text = capsys.readouterr().out
    assert text.startswith("capacity plan: task ave, preset tiny, 256 x h100 GPUs, MFU 0.4")
    assert re.search(r"stored bytes per sample .*ESTIMATE \(no --shards\)", text)
    assert re.search(r"dataset samples +3,339 +official training split \(nominal\)", text)
    for formula in ("= mfu * peak / flops_per_sample", "= gpus * samples_per_s_per_gpu",
                    "= ceil(samples_per_s / decode_rate_per_core)",
                    "= samples_per_s * bytes_per_sample",
                    "= decoded_batch_bytes * prefetch * workers_per_node",
                    "= checkpoint_bytes_rank0 / ckpt_bandwidth"):
        assert formula in text, formula
    assert text.count("      with ") >= 15
    assert "note: bytes per sample is an estimate" in text


def test_predict_data_wait():
    # demand = 2 workers x 4 samples / 0.1 s = 80 samples/s
    assert capacity.predict_data_wait(100, 1, 0.1, 4, 2) == 0.0  # supply 100 >= 80
    assert capacity.predict_data_wait(20, 2, 0.1, 4, 2) == pytest.approx(0.5)  # 40 of 80
    assert capacity.predict_data_wait(20, 1, 0.1, 4, 2) == pytest.approx(0.75)
    assert capacity.predict_data_wait(20, 2, 0.1, 4, 2, efficiency=0.5) == pytest.approx(0.75)
    assert capacity.predict_data_wait(20, 0, 0.1, 4, 2) == 1.0
    # a short run also waits for the pipeline to fill; a long one tends to the steady state
    short = capacity.predict_data_wait(100, 1, 0.1, 4, 2, steps=5)
    assert 0 < short < capacity.predict_data_wait(100, 1, 0.1, 4, 2, steps=1)
    assert capacity.predict_data_wait(20, 2, 0.1, 4, 2, steps=10**6) == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="step_time_s must be positive"):
        capacity.predict_data_wait(20, 2, 0, 4, 2)


_DS_SAVE = textwrap.dedent("""
    import json, os, sys, tempfile
    import torch
    from avmoe.tasks import get_task
    from avmoe.train import checkpoint as ck
    from avmoe.train.engine import build_optimizer, deepspeed_config, initialize
    from data_pipeline.manifest import load_manifest
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in (0, 1):
        t = get_task("ave"); torch.manual_seed(0)
        cfg = t.config(preset="tiny", **t.model_keys(load_manifest(sys.argv[2], "train")))
        m = t.build_model(cfg)
        opt = build_optimizer([p for p in m.parameters() if p.requires_grad], "adam", 1e-3, 0.0)
        eng, _, _ = initialize(m, opt, None, deepspeed_config(
            micro_batch=2, grad_accum=1, zero_stage=stage, bf16=False, grad_clip=0.0, user={}))
        b = t.example_batch(cfg, 2)
        eng.backward(t.loss(eng(b), b, cfg)[0]); eng.step()
        d = tempfile.mkdtemp(dir=sys.argv[1])
        ck.save(eng, d, 0, trainer={}, rank_state={}, meta={})
        state = os.path.join(d, "ds", "state")  # DeepSpeed's files (model + optimizer states)
        out[stage] = sum(os.path.getsize(os.path.join(state, f)) for f in os.listdir(state))
    print(json.dumps(out))
""")


def test_checkpoint_size_matches_a_real_deepspeed_save(tmp_path, packed, model_cache, capsys):
    """avmoe.train.checkpoint.save of the tiny AVE model after one step, ZeRO 0 and 1, on one
    gloo rank (127.0.0.1): its DeepSpeed files against the planner's checkpoint size."""
    script = tmp_path / "ds_save.py"
    script.write_text(_DS_SAVE)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    # an earlier test's in-process group (avmoe.train.process_group.join_store) leaves this set:
    # the child would then wait for a rendezvous store nobody serves on MASTER_PORT
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), packed], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    for stage in (0, 1):
        p = plan_json(capsys, "--task", "ave", "--preset", "tiny", "--shards", packed, "--gpus",
                      "1", "--zero-stage", str(stage), "--calibration", model_cache)
        assert val(p, "checkpoint_bytes") == pytest.approx(real[stage], rel=0.03), (stage, real)
        assert val(p, "checkpoint_bytes_rank0") == pytest.approx(real[stage], rel=0.03)


def test_help_and_layering():
    out = subprocess.run([sys.executable, "-m", "data_pipeline", "plan", "--help"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.startswith("usage: data_pipeline plan")
    for flag in ("--calibrate", "--explain", "--json", "--shards", "--mfu", "--decode-on"):
        assert flag in out
    # data_pipeline never imports avmoe at module level (the planner loads it by name)
    pattern = re.compile(r"^\s*(from|import) avmoe", re.M)
    hits = [str(p) for p in (REPO / "data_pipeline").rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []
