"""``verify`` accepts exactly what the streaming ingest accepts (one code path: the manifest
loader and the decode tasks' ``SampleDecoder``), hostile manifests are named errors for every
reader, and a FIFO or directory in place of a shard or manifest never hangs a reader."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_ingest_errors import all_batches, copy_split, good, rewrite_sample  # noqa: E402,F401

from data_pipeline.errors import ShardError  # noqa: E402
from data_pipeline.ingest import IngestConfig, IngestError, ShardStream  # noqa: E402
from data_pipeline.pack import PackOptions, pack  # noqa: E402
from data_pipeline.verify import verify  # noqa: E402


def jpeg(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _labels(update):
    def mutate(m):
        lab = json.loads(m["json"])
        update(lab)
        m["json"] = json.dumps(lab).encode()
        return m
    return mutate


def _set(name, value):
    def mutate(m):
        m[name] = value
        return m
    return mutate


# What verify used to call "verified" and training rejects; each also fails the ingest.
def damage(case: str, url, manifest):
    """Apply one kind of damage to sample 1 of shard 1; returns (key, member or None, regex)."""
    e1 = manifest["shards"][1]
    key = e1["keys"][1]
    if case == "sample-sha256":  # the shard's sha256 is right, one sample's is not
        e1["sample_sha256"][1] = "0" * 64
        (url / "train.manifest.json").write_text(json.dumps(manifest))
        return key, None, "sha256 mismatch"
    if case == "bad-span":  # the last span swallows the end-of-archive block (hash updated)
        import hashlib

        last = e1["spans"][-1]
        last[1] += 512
        data = (url / e1["name"]).read_bytes()
        e1["sample_sha256"][-1] = hashlib.sha256(data[last[0]:last[0] + last[1]]).hexdigest()
        (url / "train.manifest.json").write_text(json.dumps(manifest))
        return e1["keys"][-1], None, "end-of-archive block inside the sample span"
    if case == "label-out-of-range":
        rewrite_sample(url, manifest, 1, key, _labels(lambda lab: lab.update(
            segment_labels=[40] * 10)))
        return key, "json", r"segment_labels.*0\.\.27 or 28"
    if case == "label-missing":
        rewrite_sample(url, manifest, 1, key, _labels(lambda lab: lab.pop("segment_labels")))
        return key, "json", "'segment_labels': missing"
    if case == "float32-audio":
        rewrite_sample(url, manifest, 1, key, _set("audio.npy", npy(np.zeros(320_000, np.float32))))
        return key, "audio.npy", r"expected int16 \(320000,\), got float32"
    if case == "frame-size":
        rewrite_sample(url, manifest, 1, key, _set("f04.jpg", jpeg(48)))
        return key, "f04.jpg", "frame is 48x48, manifest frame_size 32"
    raise ValueError(case)


CASES = ["sample-sha256", "bad-span", "label-out-of-range", "label-missing", "float32-audio",
         "frame-size"]


@pytest.mark.parametrize("case", CASES)
def test_verify_rejects_what_the_ingest_rejects(good, tmp_path, ray_local, case):  # noqa: F811
    url, manifest = copy_split(good, tmp_path)
    key, member, pattern = damage(case, url, manifest)
    with pytest.raises(IngestError) as ing:
        all_batches(url, "raise")
    assert ing.value.key == key and ing.value.member == member, str(ing.value)
    with pytest.raises(ShardError) as ver:
        verify(str(url))
    msg = str(ver.value)
    assert repr(key) in msg and re.search(pattern, msg), msg
    if member:
        assert repr(member) in msg
    # one code path: the same problem text, word for word
    problem = str(ing.value).split(": ", 2)[-1].split(" (on_error=")[0]
    assert problem in msg, (problem, msg)


def test_a_shard_listed_twice(good, tmp_path):  # noqa: F811
    url, manifest = copy_split(good, tmp_path)
    manifest["shards"].append(dict(manifest["shards"][0]))
    manifest["num_samples"] += manifest["shards"][0]["samples"]
    (url / "train.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"'shards\[3\]\.name' .* is listed twice \(also shards\[0\]\)"):
        verify(str(url))
    with pytest.raises(IngestError, match="listed twice"):
        ShardStream(IngestConfig(url=str(url), batch_size=2))


def _hostile(m: dict, case: str) -> str:
    """Mutate manifest ``m``; returns the field the error must name."""
    s0 = m["shards"][0]
    if case == "negative-span":
        s0["spans"][1][0] = -512
        return "shards[0].spans[1]"
    if case == "huge-span":
        s0["spans"][-1][1] = 10**12
        return "shards[0].spans"
    if case == "absurd-frame-size":
        m["options"]["frame_size"] = 10**6
        return "options.frame_size"
    if case == "negative-segments":
        m["segments"] = -3
        return "segments"
    if case == "huge-segments":
        m["segments"] = 10**7
        return "segments"
    if case == "path-in-shard-name":
        s0["name"] = "../../../etc/passwd"
        return "shards[0].name"
    if case == "num-samples":
        m["num_samples"] += 5
        return "num_samples"
    if case == "bad-key":
        s0["keys"][0] = "a/b"
        return "shards[0].keys[0]"
    if case == "not-a-sha":
        s0["sample_sha256"][0] = "zz"
        return "shards[0].sample_sha256[0]"
    if case == "shards-not-a-list":
        m["shards"] = {"a": 1}
        return "shards"
    if case == "label-vocab":
        m["label_vocab"] = {"no": "classes"}
        return "label_vocab"
    raise ValueError(case)


HOSTILE = ["negative-span", "huge-span", "absurd-frame-size", "negative-segments",
           "huge-segments", "path-in-shard-name", "num-samples", "bad-key", "not-a-sha",
           "shards-not-a-list", "label-vocab"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_manifest_is_a_named_error_for_every_reader(good, tmp_path, case):  # noqa: F811
    url, manifest = copy_split(good, tmp_path)
    fld = _hostile(manifest, case)
    (url / "train.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as ver:
        verify(str(url))
    with pytest.raises(IngestError) as ing:
        ShardStream(IngestConfig(url=str(url), batch_size=2))
    for e in (ver.value, ing.value):
        assert "train.manifest.json" in str(e) or str(url) in str(e)
        assert repr(fld) in str(e) or fld in str(e), str(e)
    from avmoe.config import ConfigError
    from avmoe.train.driver import _load_manifest

    with pytest.raises(ConfigError, match=re.escape(fld)):
        _load_manifest(str(url), "train")


# ------------------------------------------------------------------------------ FIFOs, dirs
@pytest.mark.parametrize("what", ["shard-fifo", "shard-dir", "manifest-fifo", "manifest-dir"])
def test_verify_never_blocks_on_a_fifo(good, tmp_path, what):  # noqa: F811
    url, manifest = copy_split(good, tmp_path)
    target = url / (manifest["shards"][1]["name"] if what.startswith("shard")
                    else "train.manifest.json")
    target.unlink()
    os.mkfifo(target) if what.endswith("fifo") else target.mkdir()
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", str(url), "--split",
                           "train"], capture_output=True, text=True, timeout=120)
    kind = "a FIFO" if what.endswith("fifo") else "a directory"
    assert proc.returncode == 1 and f"is {kind}, not a regular file" in proc.stderr, proc.stderr
    assert target.name in proc.stderr and "Traceback" not in proc.stderr
    # inspect reads the same files
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "inspect", str(url), "--key",
                           manifest["shards"][1]["keys"][0], "--png", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"is {kind}, not a regular file" in proc.stderr, proc.stderr


@pytest.mark.timeout(180)
def test_ingest_never_blocks_on_a_fifo_shard(good, tmp_path, ray_local):  # noqa: F811
    url, manifest = copy_split(good, tmp_path)
    entry = manifest["shards"][1]
    (url / entry["name"]).unlink()
    os.mkfifo(url / entry["name"])
    with pytest.raises(IngestError, match=r"shard is a FIFO, not a regular file") as e:
        all_batches(url, "raise")
    assert e.value.shard == entry["name"] and e.value.key == entry["keys"][0]
    s, batches = all_batches(url, "skip")
    assert s.skipped_total == entry["samples"]
    assert [k for b in batches for k in b.keys] == \
        [k for sh in manifest["shards"] if sh is not entry for k in sh["keys"]]


# ------------------------------------------------------------------------------ masks
@pytest.fixture(scope="module")
def avs_shards(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("avs-hostile")
    pack("avs-s4", str(synth_root / "avs-s4"), "test", str(out),
         PackOptions(frame_size=32, mask_size=32), progress=False)
    return out


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [48, 100_000])
def test_mask_of_another_size_is_refused_before_decoding(avs_shards, tmp_path, size):
    import shutil

    url = tmp_path / "shards"
    shutil.copytree(avs_shards, url)
    manifest = json.loads((url / "test.manifest.json").read_text())
    key = manifest["shards"][0]["keys"][0]
    if size == 48:
        data = png(48, 48)
    else:  # a header announcing 10^10 pixels over a few bytes (decompression bomb)
        import struct
        import zlib

        def chunk(kind, d):
            return struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d))
        data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    manifest["split"] = "train"  # rewrite_sample writes train.manifest.json
    rewrite_sample(url, manifest, 0, key, _set("m02.png", data))
    (url / "test.manifest.json").unlink()
    with pytest.raises(ShardError, match=rf"{key!r} member 'm02\.png': does not decode as a "
                                         rf"32x32 PNG.*(mask is {size}x{size}, expected 32x32|"
                                         r"DecompressionBombError)"):
        verify(str(url))
