"""``python -m avmoe.predict``: a user's video through the packer's and the ingest's own paths
(no train/serve skew: the batch equals the packed-then-streamed sample, the outputs agree to 1e-6),
every task's record and picture from a real checkpoint, and the named errors."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import base_config  # noqa: E402

from avmoe.predict import PredictError, load_model, main, predict_video  # noqa: E402
from data_pipeline.demo import prepare_demo_shards  # noqa: E402
from data_pipeline.pack import PackOptions, pack  # noqa: E402
from data_pipeline.synth import synth  # noqa: E402

TASKS = ["ave", "avvp", "avs-s4", "avqa"]


def _videos(root, dataset: str) -> tuple[str, str]:
    """(shards of every split, the raw tree) of a synthetic set; AVE / AVVP / AVQA from mp4
    videos (``pack --from-videos``), AVSBench (whose masks are aligned to its frames) from frames."""
    raw = os.path.join(root, dataset, "raw")
    out = os.path.join(root, dataset, "shards")
    videos = dataset != "avs-s4"
    synth(dataset, 4, raw, seed=5, size=48, videos=videos)
    for split in ("train", "val", "test"):
        pack(dataset, raw, split, out, PackOptions(frame_size=32, mask_size=32, from_videos=videos), workers=1,
             progress=False)
    return out, raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """One in-process training step of each task's tiny preset on those shards: a real checkpoint."""
    from avmoe.train.driver import prepare, run_local

    root = str(tmp_path_factory.mktemp("predict"))
    out = {}
    for name in TASKS:
        shards, raw = _videos(root, name)
        cfg = base_config(name, shards, os.path.join(root, "runs"), name.replace("-", "_"), workers=1, test=name == "ave",
                          batch_size=2, limit_train_batches=1, limit_eval_batches=1, metrics=False, tracking="none")
        run_local(prepare(cfg))
        out[name] = (os.path.join(root, "runs", name.replace("-", "_")), shards, raw)
    return out


def _test_video(raw: str, dataset: str, tmp_path) -> str:
    """A test clip of the set (AVSBench, packed from frames: a clip written from synthetic frames)."""
    if dataset != "avs-s4":
        return os.path.join(raw, "videos", sorted(os.listdir(os.path.join(raw, "videos")))[0])
    from data_pipeline.synthetic import draw_objects, noise_image, segment_audio, write_video

    rng = np.random.default_rng(0)
    frames = [noise_image(rng, 48) for _ in range(5)]
    for img in frames:
        draw_objects(img, [(1, 4, None)])
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames, segment_audio(rng, 5, [[(1, 4)]] * 5), fps=1)
    return path


def _question(entry: dict) -> str:
    """A MUSIC-AVQA annotation's question with its template values filled in (what a user types)."""
    text = entry["question_content"]
    for v in json.loads(entry["templ_values"]):
        text = text[:text.index("<")] + v + text[text.index(">") + 1:]
    return text


@pytest.mark.parametrize("name", ["ave", "avqa"])
def test_a_video_is_seen_as_its_packed_copy(runs, name, tmp_path):
    """The batch ``sample_from_video`` makes of a test video equals the sample the streaming
    ingest decodes from its ``pack --from-videos`` copy (frames, audio bit for bit), and the model's
    outputs on the two agree to 1e-6."""
    from data_pipeline.inference import sample_from_video
    from data_pipeline.ingest import IngestConfig, ShardStream
    from data_pipeline.manifest import load_manifest

    run, shards, raw = runs[name]
    manifest = load_manifest(shards, "test")
    stream = ShardStream(IngestConfig(url=shards, split="test", batch_size=1, seed=0, shuffle=False, drop_last=False))
    packed = {b.keys[0]: b for b in stream.epoch(0)}
    key = next(iter(packed))
    labels_q = {}
    if name == "avqa":
        q = json.load(open(os.path.join(raw, "json_update", "avqa-test.json")))
        entry = next(e for e in q if f"{e['video_id']}_q{e['question_id']}" == key)
        labels_q = {"question": _question(entry), "question_type": "/".join(json.loads(entry["type"]))}
        vid = entry["video_id"]
    else:
        vid = key
    video = os.path.join(raw, "videos", f"{vid}.mp4")
    mine = sample_from_video(video, manifest, **labels_q)
    ref = packed[key]
    assert torch.equal(mine.frames, ref.frames) and torch.equal(mine.audio, ref.audio)
    if name == "avqa":
        assert torch.equal(mine.targets["question_ids"], ref.targets["question_ids"])
    task, cfg, model, _ = load_model(run)
    with torch.no_grad():
        a, b = model(mine), model(ref)
    for k, v in a.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(v, b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TASKS)
def test_predict_writes_each_tasks_record_and_picture(runs, name, tmp_path, capsys):
    run, shards, raw = runs[name]
    video = _test_video(raw, name, tmp_path)
    argv = ["--checkpoint", run, "--video", video, "--out", str(tmp_path / "out")]
    if name == "avqa":
        q = json.load(open(os.path.join(raw, "json_update", "avqa-test.json")))[0]
        argv += ["--question", _question(q), "--question-type", "/".join(json.loads(q["type"]))]
    assert main(argv) == 0, capsys.readouterr().err
    rec = json.load(open(tmp_path / "out" / "prediction.json"))
    assert rec["task"] == name and os.path.exists(tmp_path / "out" / "prediction.png")
    if name == "ave":
        assert len(rec["seconds"]) == 10 and all(0 <= s["confidence"] <= 1 for s in rec["seconds"])
        assert rec["video_class"] in __import__("data_pipeline.datasets.ave", fromlist=["x"]).CATEGORIES
    elif name == "avvp":
        assert len(rec["audio_events"]) == len(rec["visual_events"]) == 10 and "R(2+1)D" in rec["note"]
    elif name == "avs-s4":
        assert len(rec["frames"]) == 5 and np.load(tmp_path / "out" / "masks.npy").shape == (5, 32, 32)
    else:
        probs = [a["probability"] for a in rec["top5"]]  # (the synthetic set has 4 answers)
        assert 1 <= len(probs) <= 5 and probs == sorted(probs, reverse=True) and rec["answer"] == rec["top5"][0]["answer"]
        assert "/" in rec["question_type"]
    # --eval-drop works here too, and changes what the model sees
    assert main(argv + ["--eval-drop", "audio", "--out", str(tmp_path / "drop")]) == 0
    assert json.load(open(tmp_path / "drop" / "prediction.json"))["eval_drop"] == "audio"


def test_predict_errors(runs, tmp_path, capsys):
    run, shards, raw = runs["ave"]
    video = _test_video(raw, "ave", tmp_path)
    from PIL import Image

    from data_pipeline.synthetic import write_video

    # a video without an audio track
    import av

    silent = str(tmp_path / "silent.mp4")
    with av.open(silent, "w") as c:
        s = c.add_stream("mpeg4", rate=1)
        s.width = s.height = 48
        s.pix_fmt = "yuv420p"
        for _ in range(10):
            for pkt in s.encode(av.VideoFrame.from_image(Image.new("RGB", (48, 48)))):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    short = str(tmp_path / "short.mp4")
    write_video(short, [Image.new("RGB", (48, 48))] * 2, np.zeros(2 * 32000, np.float32), fps=1)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    for argv, says in ((["--video", silent], "audio stream"), (["--video", short], "too short"),
                       (["--video", str(junk)], "undecodable"), (["--video", str(tmp_path / "none.mp4")], "none.mp4"),
                       (["--video", video, "--question", "Is it playing?"], "AVQA model"),
                       (["--video", video, "--checkpoint", str(tmp_path / "norun")], "does not exist")):
        if "--checkpoint" not in argv:
            argv = ["--checkpoint", run] + argv
        assert main(argv + ["--out", str(tmp_path / "o")]) == 2
        assert says in capsys.readouterr().err, says
    avqa_run, _, avqa_raw = runs["avqa"]
    with pytest.raises(PredictError, match="question"):
        predict_video(avqa_run, video, str(tmp_path / "q"))
    with pytest.raises(PredictError, match="not in the model"):
        predict_video(avqa_run, video, str(tmp_path / "q"), question="Is the zebraphone xylotuning?")


def test_batch_inference_on_two_actors_equals_the_test_evaluation(runs, tmp_path, capsys):
    """``--shards``: the ingest's decode tasks feed an actor pool of 2 models; the output parts,
    read back, give the trainer's own test metric of the same checkpoint (to 1e-9); a part
    removed is the only one recomputed on the next run."""
    from avmoe.predict import evaluate_predictions, read_predictions

    run, shards, _ = runs["ave"]
    out = str(tmp_path / "predictions.parquet")
    argv = ["--checkpoint", run, "--shards", shards, "--split", "test", "--out", out, "--actors", "2", "--parts", "2",
            "--batch-size", "1", "--evaluate"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "acc" in printed
    rows = read_predictions(out)
    from data_pipeline.manifest import load_manifest

    keys = [k for s in load_manifest(shards, "test")["shards"] for k in s["keys"]]
    assert sorted(map(str, rows["key"])) == sorted(keys)  # every test sample once
    assert rows["pred.labels"].shape[1:] == (10,) or rows["pred.labels"].shape[1:] == (10, 1)
    trained = json.load(open(os.path.join(run, "results.json")))["test"]
    mine = evaluate_predictions(out, run, shards, "test")
    assert set(mine) == set(trained) and all(abs(mine[k] - trained[k]) < 1e-9 for k in trained)
    os.remove(os.path.join(out, "part-00001.parquet"))
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "1 parts were already there" in again and "part 2/2" in again and "part 1/2" not in again
    assert evaluate_predictions(out, run, shards, "test") == mine
