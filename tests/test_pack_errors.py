"""Bad input: a clear error naming the file, the video id and what was expected, before any
shard of the split is published; or --on-error skip, counted in the manifest."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataPipelineError, LayoutError, SampleError, ShardError
from data_pipeline.pack import PackOptions, pack
from data_pipeline.verify import verify

OPTS = PackOptions(frame_size=32, mask_size=32, shard_samples=2)


def first_ave_video(root: Path, split: str = "train") -> str:
    return (root / f"{split}Set.txt").read_text().splitlines()[0].split("&")[1]


def assert_nothing_published(out: Path, split: str = "train") -> None:
    assert not list(out.glob(f"{split}-*.tar")), "a shard was published despite the error"
    assert not (out / f"{split}.manifest.json").exists()


def expect_sample_error(dataset, src, out, match, split="train"):
    with pytest.raises(SampleError, match=match) as err:
        pack(dataset, str(src), split, str(out), OPTS, progress=False)
    assert_nothing_published(out, split)
    return err.value


def test_missing_frame(copy_of, tmp_path):
    src = copy_of("avvp")
    name = (src / "AVVP_train.csv").read_text().splitlines()[-1].split("\t")[0]
    frame = src / "LLP_dataset" / "frame" / name[:11] / "00000004.jpg"
    frame.unlink()
    err = expect_sample_error("avvp", src, tmp_path / "out", "missing frame")
    assert err.key == name and err.path == str(frame)


def test_missing_and_short_audio(copy_of, tmp_path):
    src = copy_of("ave")
    vid = first_ave_video(src)
    (src / "wave" / f"{vid}.npy").unlink()
    err = expect_sample_error("ave", src, tmp_path / "a", "missing audio")
    assert err.key == vid and err.path.endswith(f"wave/{vid}.npy")
    np.save(src / "wave" / f"{vid}.npy", np.zeros(319_999, np.float32))
    expect_sample_error("ave", src, tmp_path / "b",
                        r"audio too short: expected exactly 320000 samples .* got 319999")


def test_unknown_label(copy_of, tmp_path):
    src = copy_of("ave")
    lines = (src / "trainSet.txt").read_text().splitlines()
    vid = lines[2].split("&")[1]
    lines[2] = "Kazoo solo" + lines[2][lines[2].index("&"):]
    (src / "trainSet.txt").write_text("\n".join(lines) + "\n")
    err = expect_sample_error("ave", src, tmp_path / "out", "unknown label 'Kazoo solo'")
    assert err.key == vid and err.path == f"{src / 'trainSet.txt'}:3"


def test_unreadable_image(copy_of, tmp_path):
    src = copy_of("avs-s4")
    frame = sorted((src / "Single-source" / "s4_data" / "visual_frames" / "train").rglob("*_3.png"))[0]
    frame.write_bytes(frame.read_bytes()[:60])  # truncated PNG
    err = expect_sample_error("avs-s4", src, tmp_path / "out", "unreadable frame image")
    assert err.path == str(frame) and err.key in frame.name


def test_wrong_layout(copy_of, tmp_path):
    src = copy_of("ave")
    (src / "trainSet.txt").unlink()
    with pytest.raises(LayoutError, match=r"AVE train split file not found: expected the file .*trainSet.txt"):
        pack("ave", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    with pytest.raises(LayoutError, match="expected 5 '&'-separated fields"):
        (src / "trainSet.txt").write_text("Bark&abc&good&0\n")
        pack("ave", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    (src / "AVVP_train.csv").write_text("filename,event_labels\n")
    with pytest.raises(LayoutError, match="tab-separated header"):
        pack("avvp", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    assert_nothing_published(tmp_path / "o")


def test_error_after_a_shard_was_staged_publishes_nothing(copy_of, tmp_path):
    """The bad sample sorts last: two shards are already staged when it fails."""
    src = copy_of("ave")
    keys = sorted(l.split("&")[1] for l in (src / "trainSet.txt").read_text().splitlines())
    (src / "wave" / f"{keys[-1]}.npy").unlink()
    out = tmp_path / "out"
    expect_sample_error("ave", src, out, "missing audio")
    assert len(list((out / ".staging-train").glob("*.tar"))) >= 2  # kept for the resume


def test_on_error_skip_counts_in_manifest(copy_of, tmp_path):
    src = copy_of("ave")
    vid = first_ave_video(src)
    (src / "wave" / f"{vid}.npy").unlink()
    opts = PackOptions(frame_size=32, shard_samples=2, on_error="skip")
    res = pack("ave", str(src), "train", str(tmp_path / "out"), opts, progress=False)
    m = res.manifest
    assert m["num_skipped"] == 1 and m["skipped"][0]["key"] == vid
    assert "<src>/wave/" in m["skipped"][0]["error"]  # no absolute source paths
    assert m["num_samples"] == 5 and vid not in [k for s in m["shards"] for k in s["keys"]]
    verify(str(tmp_path / "out"))


def test_avs_pickle_refused_unless_trusted(copy_of, tmp_path):
    src = copy_of("avs-ms3")
    wave_dir = src / "Multi-sources" / "ms3_data" / "wave" / "test"
    table = {p.stem + ".wav": np.load(p) for p in wave_dir.glob("*.npy")}
    for p in wave_dir.glob("*.npy"):
        p.unlink()
    np.save(wave_dir / "AVS.npy", np.array(table, dtype=object), allow_pickle=True)
    err = expect_sample_error("avs-ms3", src, tmp_path / "a", "pickle", split="test")
    assert "--trust-pickle" in str(err) and err.path == str(wave_dir / "AVS.npy")
    opts = PackOptions(frame_size=32, mask_size=32, trust_pickle=True)
    res = pack("avs-ms3", str(src), "test", str(tmp_path / "b"), opts, progress=False)
    assert res.manifest["num_samples"] == len(table)
    assert "trust_pickle" not in res.manifest["options"]


def test_cli_reports_named_error_and_exit_code(copy_of, tmp_path):
    src = copy_of("ave")
    vid = first_ave_video(src)
    (src / "wave" / f"{vid}.npy").unlink()
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "pack", "--dataset", "ave",
                           "--src", str(src), "--split", "train", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert vid in proc.stderr and "missing audio" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- verify
@pytest.fixture
def good_pack(synth_root, tmp_path):
    out = tmp_path / "good"
    pack("avvp", str(synth_root / "avvp"), "train", str(out), OPTS, progress=False)
    return out


def test_verify_detects_sha_mismatch(good_pack):
    shard = sorted(good_pack.glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside a member's payload: the tar still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name}.*(sha256 mismatch|does not decode)"):
        verify(str(good_pack))


def test_verify_detects_truncation_and_missing_shard(good_pack):
    shards = sorted(good_pack.glob("train-*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:5000])
    with pytest.raises(ShardError, match=shards[0].name):
        verify(str(good_pack))
    shards[0].unlink()
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        verify(str(good_pack))


def test_verify_cli_exit_code(good_pack):
    ok = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", str(good_pack)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok train" in ok.stdout
    m = json.loads((good_pack / "train.manifest.json").read_text())
    m["shards"][0]["samples"] += 1
    (good_pack / "train.manifest.json").write_text(json.dumps(m))
    bad = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", str(good_pack)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "manifest lists" in bad.stderr
