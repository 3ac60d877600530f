"""Publishing a split is one atomic switch (local disk and S3): a reader sees the old pack or the
new one, never a mix, whenever ``pack --overwrite`` stops; racing packs: one wins, the other
stops with a named error; ``--shard-size`` means one thing on the CLI and in the API."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

import data_pipeline.pack as pack_mod
from data_pipeline import storage
from data_pipeline.errors import DataPipelineError, PackError
from data_pipeline.pack import PackOptions, Staging, pack
from data_pipeline.units import parse_size
from data_pipeline.verify import verify

OLD = PackOptions(frame_size=32, mask_size=32, shard_samples=2)
NEW = PackOptions(frame_size=40, mask_size=32, shard_samples=3)  # other shards, other bytes


def reader_sees(url: str, split: str = "train") -> str:
    """What a reader of ``url`` gets: the manifest and every shard it lists, each checked
    against its sha256; the pack's fingerprint, or an AssertionError on a mix."""
    fs, base = storage.filesystem(url)
    m = json.loads(fs.cat_file(storage.join(base, f"{split}.manifest.json")))
    for s in m["shards"]:
        data = fs.cat_file(storage.join(base, s["name"]))
        assert hashlib.sha256(data).hexdigest() == s["sha256"], \
            f"mixed pack: {s['name']} does not hold what the manifest lists"
    return m["fingerprint"]


def shard_files(url: str) -> list[str]:
    fs, base = storage.filesystem(url)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)
                  if p.endswith(".tar"))


def _overwrite_crashing_before_the_switch(src, url, monkeypatch, staging):
    old = pack("ave", src, "train", url, OLD, staging_dir=staging, progress=False).manifest
    seen = []
    real_publish, real_write = pack_mod._publish_shard, pack_mod._write_manifest

    def publish_then_read(*a, **k):  # a reader between every publication step
        real_publish(*a, **k)
        seen.append(reader_sees(url))

    def crash(*a, **k):
        seen.append(reader_sees(url))
        raise RuntimeError("killed before the manifest was written")

    monkeypatch.setattr(pack_mod, "_publish_shard", publish_then_read, raising=False)
    monkeypatch.setattr(pack_mod, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        pack("ave", src, "train", url, NEW, staging_dir=staging, overwrite=True, progress=False)
    assert seen and set(seen) == {old["fingerprint"]}  # the old pack, intact, at every step
    verify(url)
    # the re-run resumes and switches; readers then see only the new pack
    monkeypatch.setattr(pack_mod, "_write_manifest", real_write)
    real_remove = pack_mod._remove_stale_shards

    def read_then_remove(*a, **k):
        seen.append(reader_sees(url))
        real_remove(*a, **k)

    monkeypatch.setattr(pack_mod, "_remove_stale_shards", read_then_remove)
    new = pack("ave", src, "train", url, NEW, staging_dir=staging, overwrite=True,
               progress=False).manifest
    assert new["fingerprint"] != old["fingerprint"] and seen[-1] == new["fingerprint"]
    assert reader_sees(url) == new["fingerprint"]
    assert shard_files(url) == sorted(s["name"] for s in new["shards"])  # old generation gone
    assert not set(shard_files(url)) & {s["name"] for s in old["shards"]}
    verify(url)
    return old, new


def test_overwrite_is_one_switch_on_local_disk(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _overwrite_crashing_before_the_switch(str(synth_root / "ave"), str(out), monkeypatch, None)
    assert not [p for p in os.listdir(out) if p.startswith(".")], "lock or staging left behind"


def test_overwrite_is_one_switch_on_s3(synth_root, s3_env, tmp_path, monkeypatch):
    url = "s3://avmoe-test/publish/ave"
    _overwrite_crashing_before_the_switch(str(synth_root / "ave"), url, monkeypatch,
                                          str(tmp_path / "staging"))
    fs, base = storage.filesystem(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False) if not p.endswith(".tar")) \
        == ["train.manifest.json"]  # no lock object left


def test_same_input_same_names_and_bytes(synth_root, tmp_path):
    a = pack("avvp", str(synth_root / "avvp"), "test", str(tmp_path / "a"), OLD, progress=False)
    b = pack("avvp", str(synth_root / "avvp"), "test", str(tmp_path / "b"), OLD, workers=2,
             progress=False)
    assert a.manifest == b.manifest
    assert shard_files(str(tmp_path / "a")) == shard_files(str(tmp_path / "b"))


# ------------------------------------------------------------------------------ racing packs
def _race(src: str, url: str, monkeypatch, staging_a=None, staging_b=None):
    """Pack A holds the split (paused after staging its first shard) while pack B starts."""
    paused, resume = threading.Event(), threading.Event()
    real_record = Staging.record

    def record(self, index, entry):
        real_record(self, index, entry)
        if threading.current_thread().name == "pack-A" and index == 0:
            paused.set()
            resume.wait(60)

    monkeypatch.setattr(Staging, "record", record)
    result: dict = {}

    def run_a():
        try:
            result["a"] = pack("ave", src, "train", url, OLD, staging_dir=staging_a, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["a_error"] = e

    t = threading.Thread(target=run_a, name="pack-A")
    t.start()
    assert paused.wait(60), "pack A did not start"
    try:
        with pytest.raises(PackError, match=r"another pack of split 'train' is writing here") as e:
            pack("ave", src, "train", url, NEW, staging_dir=staging_b, overwrite=True,
                 progress=False)
    finally:
        resume.set()
        t.join(60)
    assert "a_error" not in result, result.get("a_error")
    assert reader_sees(url) == result["a"].manifest["fingerprint"]  # A won cleanly
    verify(url)
    return str(e.value)


def test_racing_packs_local(synth_root, tmp_path, monkeypatch):
    msg = _race(str(synth_root / "ave"), str(tmp_path / "out"), monkeypatch)
    assert f"pid {os.getpid()}" in msg and "stopped before writing anything" in msg


def test_racing_packs_s3(synth_root, s3_env, tmp_path, monkeypatch):
    msg = _race(str(synth_root / "ave"), "s3://avmoe-test/race/ave", monkeypatch,
                str(tmp_path / "sa"), str(tmp_path / "sb"))
    assert "s3://avmoe-test/race/ave/.train.pack-lock" in msg


def test_s3_lock_of_a_killed_pack(synth_root, s3_env, tmp_path):
    url = "s3://avmoe-test/stale/ave"
    fs, base = storage.filesystem(url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = storage.join(base, ".train.pack-lock")
    # left by a pack killed on this host: taken over
    fs.pipe_file(lock, json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    pack("ave", str(synth_root / "ave"), "train", url, OLD, staging_dir=str(tmp_path / "s"),
         progress=False)
    assert not fs.exists(lock)
    # held by a pack on another host: named, with the URL to delete if it is dead
    fs.pipe_file(lock, json.dumps({"host": "other-host", "pid": 1, "started": "x"}).encode())
    with pytest.raises(PackError, match=r"pid 1 on other-host.*delete "
                                        r"s3://avmoe-test/stale/ave/\.train\.pack-lock"):
        pack("ave", str(synth_root / "ave"), "train", url, NEW, staging_dir=str(tmp_path / "s"),
             overwrite=True, progress=False)
    assert fs.exists(lock)


# ------------------------------------------------------------------------------ one size unit
def test_shard_size_units():
    assert parse_size("256MB") == 256_000_000 and parse_size("256mb") == 256_000_000
    assert parse_size("256MiB") == 256 * 2**20 and parse_size("1 GiB") == 2**30
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("500k") == 500_000
    assert parse_size("1048576") == parse_size(1048576) == 2**20
    for bad in ("12 parsecs", "-5MB", "MB", ""):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    assert PackOptions(shard_bytes="1MiB").shard_bytes == PackOptions(shard_bytes=2**20).shard_bytes
    with pytest.raises(PackError, match="shard_bytes: not a size"):
        PackOptions(shard_bytes="lots")
    from data_pipeline.cli import build_parser

    args = build_parser().parse_args(["pack", "--dataset", "ave", "--src", "s", "--split", "train",
                                      "--out", "o"])
    assert args.shard_size == PackOptions().shard_bytes == 256_000_000  # one default


def test_pack_started_from_the_api_resumes_from_the_cli(synth_root, tmp_path):
    src = str(synth_root / "ave")
    ref, out = tmp_path / "ref", tmp_path / "out"
    opts = PackOptions(frame_size=32, shard_samples=2, shard_bytes="1MiB")
    pack("ave", src, "train", str(ref), opts, progress=False)
    pack("ave", src, "train", str(out), opts, progress=False, _stop_after_shards=1)
    cli = [sys.executable, "-m", "data_pipeline", "pack", "--dataset", "ave", "--src", src,
           "--split", "train", "--frame-size", "32", "--shard-samples", "2"]
    done = subprocess.run(cli + ["--out", str(out), "--shard-size", "1048576"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # the staged shard was accepted: same fingerprint
    assert json.loads((out / "train.manifest.json").read_text()) == \
        json.loads((ref / "train.manifest.json").read_text())
    # the CLI default and the API default are the same pack: nothing to do
    pack("ave", src, "test", str(out), PackOptions(frame_size=32), progress=False)
    before = (out / "test.manifest.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "data_pipeline", "pack", "--dataset", "ave",
                            "--src", src, "--split", "test", "--frame-size", "32", "--out",
                            str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (out / "test.manifest.json").stat().st_mtime_ns == before


def test_gs_needs_gcsfs_named(tmp_path):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises(DataPipelineError, match=r"gs:// URLs need the gcsfs package"):
        storage.filesystem("gs://bucket/shards")
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", "gs://bucket/shards"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "gcsfs" in proc.stderr and "Traceback" not in proc.stderr
