"""Hostile or unlucky raw input to ``pack``: every case is a named ``PackError`` (file, key and
what was expected) before anything is published, or, with ``--on-error skip``, a skipped sample
counted in the manifest; nothing is silently wrong and nothing hangs."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.datasets import list_datasets
from data_pipeline.errors import LayoutError, PackError, SampleError
from data_pipeline.pack import PackOptions, pack
from data_pipeline.verify import verify

OPTS = PackOptions(frame_size=32, mask_size=32, shard_samples=2)
SKIP = PackOptions(frame_size=32, mask_size=32, shard_samples=2, on_error="skip")
MEDIA = {".jpg", ".png", ".npy", ".wav", ".mp4"}


def ave_rows(src: Path, split: str = "train") -> list[str]:
    return (src / f"{split}Set.txt").read_text().splitlines()


def nothing_published(out: Path, split: str = "train") -> bool:
    return not list(out.glob(f"{split}-*.tar")) and not (out / f"{split}.manifest.json").exists()


def cli_pack(src: Path, out: Path, dataset: str = "ave", *extra: str, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "data_pipeline", "pack", "--dataset", dataset,
                           "--src", str(src), "--split", "train", "--out", str(out),
                           "--frame-size", "32", *extra], capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------ AVE classes
def test_ave_categories_cannot_take_the_background_index(copy_of, tmp_path):
    src = copy_of("ave")
    cats = (src / "categories.txt").read_text().splitlines()
    assert len(cats) == 28
    (src / "categories.txt").write_text("\n".join(cats + ["Kazoo"]) + "\n")
    with pytest.raises(LayoutError, match=r"categories\.txt: 29 categories, .*reserve index 28 "
                                          r"for background.*line 29"):
        pack("ave", str(src), "train", str(tmp_path / "a"), OPTS, progress=False)
    dup = cats[:5] + [cats[2]] + cats[5:27]
    (src / "categories.txt").write_text("\n".join(dup) + "\n")
    with pytest.raises(LayoutError, match=rf"categories\.txt:6: category {cats[2]!r} is listed "
                                          r"twice \(also on line 3\)"):
        pack("ave", str(src), "train", str(tmp_path / "b"), OPTS, progress=False)
    assert nothing_published(tmp_path / "a") and nothing_published(tmp_path / "b")


# ------------------------------------------------------------------------------ ids outside --src
def test_ids_that_leave_the_source_tree_are_refused(copy_of, tmp_path):
    src = copy_of("ave")
    rows = ave_rows(src)
    vid = rows[0].split("&")[1]
    # a real-looking sample outside --src that "../../x" reaches
    shutil.copytree(src / "frames" / vid, tmp_path / "x")
    shutil.copy(src / "wave" / f"{vid}.npy", tmp_path / "x.npy")
    rows[0] = rows[0].replace(f"&{vid}&", "&../../x&")
    (src / "trainSet.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(SampleError, match=r"leads outside the source directory") as e:
        pack("ave", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    assert e.value.key == "------x" and nothing_published(tmp_path / "o")
    res = pack("ave", str(src), "train", str(tmp_path / "s"), SKIP, progress=False)
    assert [s["key"] for s in res.manifest["skipped"]] == ["------x"]
    assert "outside the source directory" in res.manifest["skipped"][0]["error"]


# ------------------------------------------------------------------------------ audio
def _wave_case(case: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(n) * 0.1).astype(np.float32)
    if case == "nan":
        w[1234] = np.nan
    elif case == "inf":
        w[7] = np.inf
    elif case == "bool":
        w = w > 0
    elif case == "complex":
        w = w + 1j * w
    elif case == "strings":
        w = np.array([str(x) for x in w[:n]])
    elif case == "int32":
        w = (w * 2**30).astype(np.int32)
    elif case == "stereo-half":  # (2, N/2): the size of a mono clip, but two short channels
        w = w.reshape(2, n // 2)
    elif case == "three-channels":
        w = np.stack([w, w, w])
    return w


@pytest.mark.parametrize("case,problem", [
    ("nan", r"1 non-finite samples \(NaN or inf; the first at sample 1234\)"),
    ("inf", r"non-finite samples .*first at sample 7"),
    ("bool", r"audio has dtype bool"),
    ("complex", r"audio has dtype complex64"),
    ("strings", r"audio has dtype <U"),
    ("int32", r"audio has dtype int32"),
    ("stereo-half", r"audio must be mono .*got shape \(2, 160000\)"),
    ("three-channels", r"shape \(3, 320000\)"),
])
def test_bad_audio_is_a_named_error(copy_of, tmp_path, case, problem):
    src = copy_of("ave")
    vid = ave_rows(src)[1].split("&")[1]
    wave = src / "wave" / f"{vid}.npy"
    np.save(wave, _wave_case(case, 320_000))
    with pytest.raises(SampleError, match=problem) as e:
        pack("ave", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    assert e.value.key == vid and e.value.path == str(wave)
    assert nothing_published(tmp_path / "o")


@pytest.mark.parametrize("layout", ["(2, N)", "(N, 2)"])
def test_stereo_audio_is_down_mixed(copy_of, tmp_path, layout):
    src = copy_of("ave")
    vid = ave_rows(src)[0].split("&")[1]
    left = np.load(src / "wave" / f"{vid}.npy").astype(np.float32)
    right = np.roll(left, 5) * 0.5
    stereo = np.stack([left, right]) if layout == "(2, N)" else np.stack([left, right], axis=1)
    np.save(src / "wave" / f"{vid}.npy", stereo)
    res = pack("ave", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    import webdataset as wds

    urls = [str(tmp_path / "o" / s["name"]) for s in res.manifest["shards"]]
    got = {s["__key__"]: np.load(io.BytesIO(s["audio.npy"])) for s in wds.WebDataset(
        urls, shardshuffle=False, empty_check=False)}[vid]
    want = np.round(np.clip((left.astype(np.float64) + right) / 2, -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(got, want)


# ------------------------------------------------------------------------------ images
def png_bomb(path: Path, width: int, height: int) -> None:
    """A few hundred bytes of PNG whose header announces width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_decompression_bomb_images_are_refused(copy_of, tmp_path):
    src = copy_of("avs-s4")
    frame = sorted((src / "Single-source" / "s4_data" / "visual_frames" / "train").rglob("*_2.png"))[0]
    png_bomb(frame, 100_000, 100_000)  # 10^10 pixels (PIL alone raises its own bomb error)
    with pytest.raises(SampleError, match=r"10,?000,?000,?000 pixels.*decompression bomb") as e:
        pack("avs-s4", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)
    assert e.value.path == str(frame)
    png_bomb(frame, 9000, 9000)  # 81 M: under PIL's warning threshold, over ours
    with pytest.raises(SampleError, match=r"9000x9000 = 81,000,000 pixels"):
        pack("avs-s4", str(src), "train", str(tmp_path / "o"), OPTS, progress=False)


# ------------------------------------------------------------------------------ FIFOs, dirs
@pytest.mark.parametrize("what", ["frame-fifo", "wave-fifo", "frame-dir", "wave-dir"])
def test_fifo_or_directory_instead_of_a_file_does_not_hang(copy_of, tmp_path, what):
    src = copy_of("ave")
    vid = ave_rows(src)[0].split("&")[1]
    target = (src / "frames" / vid / "00000005.jpg") if what.startswith("frame") else \
        (src / "wave" / f"{vid}.npy")
    target.unlink()
    os.mkfifo(target) if what.endswith("fifo") else target.mkdir()
    kind = "a FIFO" if what.endswith("fifo") else "a directory"
    proc = cli_pack(src, tmp_path / "o", timeout=120)  # a blocked open would time out here
    assert proc.returncode == 1, proc.stderr
    assert f"is {kind}, not a regular file" in proc.stderr and vid in proc.stderr
    assert str(target) in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ annotations
@pytest.mark.parametrize("dataset", list_datasets())
def test_invalid_utf8_in_annotations(copy_of, tmp_path, dataset):
    src = copy_of(dataset)
    annotations = [p for p in src.rglob("*") if p.is_file() and p.suffix not in MEDIA]
    assert annotations
    for p in annotations:
        lines = p.read_bytes().split(b"\n")
        lines[min(1, len(lines) - 1)] += b"\xff\xfe"
        p.write_bytes(b"\n".join(lines))
    with pytest.raises(LayoutError, match=r":\d+: .* is not valid UTF-8 \(byte 0xff at offset \d+"):
        pack(dataset, str(src), "train", str(tmp_path / "o"), OPTS, progress=False)


# ------------------------------------------------------------------------------ the output
def test_out_that_is_a_file(synth_root, tmp_path):
    out = tmp_path / "out.tar"
    out.write_bytes(b"precious")
    with pytest.raises(PackError, match=r"--out .*out\.tar is a file, not a directory"):
        pack("ave", str(synth_root / "ave"), "train", str(out), OPTS, progress=False)
    proc = cli_pack(synth_root / "ave", out / "sub")
    assert proc.returncode == 1 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"precious"


def test_disk_full_is_named_and_the_pack_resumes(synth_root, tmp_path, monkeypatch):
    """ENOSPC from the shard writer after the first shard: a PackError naming the staged file;
    the finished shard is kept and the re-run gives the uninterrupted bytes."""
    import data_pipeline.tario as tario

    src = str(synth_root / "ave")
    ref, out = tmp_path / "ref", tmp_path / "out"
    first = pack("ave", src, "train", str(ref), OPTS, progress=False).manifest["shards"][0]["bytes"]
    real_write = tario.DeterministicTarWriter._write
    written = {"n": 0}

    def write(self, buf):  # the disk fills up inside the second shard
        written["n"] += len(buf)
        if written["n"] > first * 1.5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, buf)

    monkeypatch.setattr(tario.DeterministicTarWriter, "_write", write)
    with pytest.raises(PackError, match=r"\.staging-train/train-[0-9a-f]{12}-\d{6}\.tar\.partial: "
                                        r"cannot write \(No space left on device\); free some "
                                        r"space and re-run"):
        pack("ave", src, "train", str(out), OPTS, progress=False)
    staged = list((out / ".staging-train").glob("*.tar"))
    assert staged and nothing_published(out)
    monkeypatch.setattr(tario.DeterministicTarWriter, "_write", real_write)
    res = pack("ave", src, "train", str(out), OPTS, progress=False)
    assert res.encoded < res.manifest["num_samples"]  # resumed after the kept shard(s)
    assert (out / "train.manifest.json").read_bytes() == (ref / "train.manifest.json").read_bytes()
    for s in res.manifest["shards"]:
        assert (out / s["name"]).read_bytes() == (ref / s["name"]).read_bytes()

    # disk full while writing the manifest: named; the previous manifest is untouched
    import data_pipeline.pack as pack_mod

    real_fsync = os.fsync

    def fsync(fd):  # only the manifest's write finds the disk full
        if "manifest.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    manifest = (out / "train.manifest.json").read_bytes()
    monkeypatch.setattr(pack_mod.os, "fsync", fsync)
    with pytest.raises(PackError, match=r"train\.manifest\.json: cannot write \(No space left on "
                                        r"device\)"):
        pack("ave", src, "train", str(out), PackOptions(frame_size=40, shard_samples=2),
             overwrite=True, progress=False)
    monkeypatch.undo()
    assert (out / "train.manifest.json").read_bytes() == manifest
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert reader_sees_old(out, manifest)
    verify(str(out))


def reader_sees_old(out: Path, manifest: bytes) -> bool:
    import hashlib

    m = json.loads(manifest)
    return all(hashlib.sha256((out / sh["name"]).read_bytes()).hexdigest() == sh["sha256"]
               for sh in m["shards"])


# ------------------------------------------------------------------------------ skip and count
def test_on_error_skip_counts_every_new_kind(copy_of, tmp_path):
    src = copy_of("ave")
    rows = ave_rows(src)
    vids = [r.split("&")[1] for r in rows]
    np.save(src / "wave" / f"{vids[0]}.npy", _wave_case("nan", 320_000))
    frame = src / "frames" / vids[1] / "00000003.jpg"
    frame.unlink()
    os.mkfifo(frame)
    png_bomb(src / "frames" / vids[2] / "00000004.jpg", 100_000, 100_000)
    np.save(src / "wave" / f"{vids[3]}.npy", _wave_case("strings", 320_000))
    res = pack("ave", str(src), "train", str(tmp_path / "o"), SKIP, progress=False)
    m = res.manifest
    skipped = {s["key"]: s["error"] for s in m["skipped"]}
    assert sorted(skipped) == sorted(vids[:4]) and m["num_skipped"] == 4
    assert "non-finite" in skipped[vids[0]] and "is a FIFO" in skipped[vids[1]]
    assert "pixels" in skipped[vids[2]] and "dtype <U" in skipped[vids[3]]
    assert m["num_samples"] == len(vids) - 4
    verify(str(tmp_path / "o"))
    assert json.loads((tmp_path / "o" / "train.manifest.json").read_text())["num_skipped"] == 4
