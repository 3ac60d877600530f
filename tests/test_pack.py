"""The packer on every official layout (from synth output): read back by webdataset and by
Ray, byte-identical repacks, kill-and-resume, --from-videos."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.datasets import get_dataset, list_datasets
from data_pipeline.pack import PackOptions, pack
from data_pipeline.verify import verify

DATASETS = list_datasets()
SMALL = PackOptions(frame_size=32, mask_size=32, shard_samples=4)


def digest_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def packed(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    for ds in DATASETS:
        for split in ("train", "test"):
            pack(ds, str(synth_root / ds), split, str(out / ds), SMALL, progress=False)
    return out


@pytest.mark.parametrize("dataset", DATASETS)
def test_pack_layout_reads_back_with_webdataset(packed, synth_root, dataset):
    out = packed / dataset
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert manifest["dataset"] == dataset and manifest["schema_version"] == 1
    keys_in_manifest = [k for s in manifest["shards"] for k in s["keys"]]
    assert keys_in_manifest == sorted(keys_in_manifest)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == keys_in_manifest
    t = get_dataset(dataset).segments
    for s in samples:
        labels = json.loads(s["json"])
        members = sorted(k for k in s if not k.startswith("__"))
        assert members == get_dataset(dataset).members(labels)
        audio = np.load(io.BytesIO(s["audio.npy"]), allow_pickle=False)
        assert audio.dtype == np.int16 and audio.shape == (t * 32000,)
        assert np.abs(audio).max() > 1000  # the class tone survived the int16 conversion
    # the raw waveform, converted, is what the shard holds
    first = samples[0]
    vid = json.loads(first["json"])["video_id"]
    if dataset == "ave":
        raw = np.load(synth_root / "ave" / "wave" / f"{vid}.npy")
        got = np.load(io.BytesIO(first["audio.npy"])).astype(np.float64) / 32767
        assert np.allclose(got, raw, atol=1 / 32767)
        assert json.loads(first["json"])["segment_labels"][:1][0] in range(29)


def test_ray_read_webdataset_reads_shards(packed, ray_local):
    import ray

    out = packed / "ave"
    manifest = json.loads((out / "train.manifest.json").read_text())
    paths = [str(out / s["name"]) for s in manifest["shards"]]
    ds = ray.data.read_webdataset(paths, decoder=None)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(k for s in manifest["shards"]
                                                        for k in s["keys"])
    row = rows[0]
    assert {"f00.jpg", "f09.jpg", "audio.npy", "json"} <= set(row)
    labels = json.loads(row["json"])
    assert len(labels["segment_labels"]) == 10


def test_repack_is_byte_identical_across_workers(synth_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pack("avvp", str(synth_root / "avvp"), "test", str(a), SMALL, workers=1, progress=False)
    pack("avvp", str(synth_root / "avvp"), "test", str(b), SMALL, workers=2, progress=False)
    assert digest_dir(a) == digest_dir(b)
    again = pack("avvp", str(synth_root / "avvp"), "test", str(a), SMALL, progress=False)
    assert again.encoded == 0  # same input and options: nothing to do
    assert digest_dir(a) == digest_dir(b)


def test_other_options_need_overwrite(synth_root, tmp_path):
    from data_pipeline.errors import DataPipelineError

    out = tmp_path / "o"
    pack("ave", str(synth_root / "ave"), "test", str(out), SMALL, progress=False)
    other = PackOptions(frame_size=40, mask_size=32, shard_samples=1)
    with pytest.raises(DataPipelineError, match="--overwrite"):
        pack("ave", str(synth_root / "ave"), "test", str(out), other, progress=False)
    res = pack("ave", str(synth_root / "ave"), "test", str(out), other, progress=False,
               overwrite=True)
    names = sorted(p.name for p in out.glob("test-*.tar"))
    assert names == [s["name"] for s in res.manifest["shards"]] and len(names) == 2
    verify(str(out))


def test_resume_after_stop_matches_uninterrupted(synth_root, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    opts = PackOptions(frame_size=32, shard_samples=2)
    pack("ave", str(synth_root / "ave"), "train", str(ref), opts, progress=False)
    pack("ave", str(synth_root / "ave"), "train", str(out), opts, progress=False,
         _stop_after_shards=1)
    assert not list(out.glob("*.tar")) and not (out / "train.manifest.json").exists()
    staged = sorted(p.name for p in (out / ".staging-train").glob("*.tar"))
    assert len(staged) == 1 and re.fullmatch(r"train-[0-9a-f]{12}-000000\.tar", staged[0])
    res = pack("ave", str(synth_root / "ave"), "train", str(out), opts, progress=False)
    assert res.encoded == res.manifest["num_samples"] - 2  # the staged shard was kept
    assert res.manifest["shards"][0]["name"] == staged[0]
    assert digest_dir(out) == digest_dir(ref)
    assert not (out / ".staging-train").exists()


def test_kill_and_resume_cli(synth_root, tmp_path):
    """SIGKILL a real `pack` process mid-split, re-run it, get the uninterrupted bytes."""
    src = synth_root / "avqa"  # 24 questions: enough shards to kill mid-way
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--dataset", "avqa", "--src", str(src), "--split", "train", "--frame-size", "32",
            "--shard-samples", "1"]
    cli = [sys.executable, "-m", "data_pipeline", "pack"]
    subprocess.run(cli + args + ["--out", str(ref)], check=True, capture_output=True)
    proc = subprocess.Popen(cli + args + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = out / ".staging-train" / "000002.json"
    deadline = time.time() + 60
    while not journal.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert journal.exists(), "the packer finished before it could be killed"
    assert not (out / "train.manifest.json").exists()
    done = subprocess.run(cli + args + ["--out", str(out)], check=True, capture_output=True,
                          text=True)
    assert "packed avqa train" in done.stdout
    assert digest_dir(out) == digest_dir(ref)


def test_flac_audio_roundtrip(synth_root, tmp_path):
    opts = PackOptions(frame_size=32, audio_format="flac")
    res = pack("avs-s4", str(synth_root / "avs-s4"), "test", str(tmp_path), opts, progress=False)
    verify(str(tmp_path))
    shard = tmp_path / res.manifest["shards"][0]["name"]
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(sample["audio.flac"]), dtype="int16")
    vid = json.loads(sample["json"])["video_id"]
    raw = next((synth_root / "avs-s4").rglob(f"{vid}.npy"))
    assert rate == 32000 and wave.shape == (160000,)
    expect = np.round(np.clip(np.load(raw).astype(np.float64), -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(wave, expect)  # FLAC is lossless over the int16 samples


@pytest.mark.parametrize("dataset", ["ave", "avqa"])
def test_pack_from_videos(tmp_path, dataset):
    from data_pipeline.synth import synth

    raw = tmp_path / "raw"
    synth(dataset, 2, str(raw), seed=3, size=48, videos=True)
    out = tmp_path / "out"
    res = pack(dataset, str(raw), "train", str(out), PackOptions(frame_size=32, from_videos=True),
               progress=False)
    assert res.manifest["num_samples"] == (2 if dataset == "ave" else 8)
    verify(str(out))
    sample = next(iter(wds.WebDataset(str(out / res.manifest["shards"][0]["name"]),
                                      shardshuffle=False)))
    audio = np.load(io.BytesIO(sample["audio.npy"]))
    assert audio.shape == (320000,) and np.abs(audio).max() > 1000
    if dataset == "ave":
        # frames of event segments carry the class shape: they differ from background frames
        labels = json.loads(sample["json"])
        from data_pipeline.decode import decode_jpeg

        frames = [decode_jpeg(sample[f"f{t:02d}.jpg"]).astype(float) for t in range(10)]
        seg = labels["segment_labels"]
        ev = [f.std() for f, s in zip(frames, seg) if s != 28]
        bg = [f.std() for f, s in zip(frames, seg) if s == 28]
        if bg:
            assert min(ev) > max(bg)


def test_manifest_spans_allow_ranged_sample_reads(packed):
    """A sample's [offset, length] span is a self-contained run of tar members with the
    recorded sha256: what a ranged (S3 byte-range) reader fetches."""
    import tarfile

    out = packed / "avvp"
    manifest = json.loads((out / "test.manifest.json").read_text())
    entry = manifest["shards"][0]
    data = (out / entry["name"]).read_bytes()
    for key, (offset, length), sha in zip(entry["keys"], entry["spans"], entry["sample_sha256"]):
        chunk = data[offset:offset + length]
        assert hashlib.sha256(chunk).hexdigest() == sha
        with tarfile.open(fileobj=io.BytesIO(chunk + b"\0" * 1024)) as tar:
            names = tar.getnames()
        assert names and all(n.split(".", 1)[0] == key for n in names)
        assert f"{key}.r2p1d.npy" in names
