"""Packing to, verifying and reading from a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys

import webdataset as wds

from data_pipeline import storage
from data_pipeline.pack import PackOptions, pack
from data_pipeline.verify import verify


def test_pack_verify_and_read_on_s3(synth_root, s3_env, tmp_path):
    url = "s3://avmoe-test/shards/avs-s4"
    opts = PackOptions(frame_size=32, mask_size=32, shard_samples=2)
    res = pack("avs-s4", str(synth_root / "avs-s4"), "train", url, opts,
               staging_dir=str(tmp_path / "staging"), progress=False)
    m = res.manifest
    fs, path = storage.filesystem(url)
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert listed == sorted([s["name"] for s in m["shards"]] + ["train.manifest.json"])
    assert not (tmp_path / "staging").exists()  # cleaned after publishing
    rep = verify(url)
    assert rep.splits == {"train": m["num_samples"]}

    # webdataset reads the objects through an s3 gopen handler
    wds.gopen_schemes["s3"] = lambda u, mode="rb", bufsize=8192, **kw: fs.open(u, mode)
    keys = [s["__key__"] for s in wds.WebDataset([f"s3://{path}/{s['name']}" for s in m["shards"]],
                                                 shardshuffle=False)]
    assert keys == [k for s in m["shards"] for k in s["keys"]]

    # the CLI verb against the same bucket, endpoint from AWS_ENDPOINT_URL
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", url],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # corrupt one object: verify names it
    name = m["shards"][0]["name"]
    fs.pipe_file(f"{path}/{name}", fs.cat_file(f"{path}/{name}")[:-10240])
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", url],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and name in proc.stderr


def test_ray_reads_shards_from_s3(synth_root, s3_env, ray_local, tmp_path):
    import pyarrow.fs as pafs
    import ray

    url = "s3://avmoe-test/shards/ave-ray"
    res = pack("ave", str(synth_root / "ave"), "test", url, PackOptions(frame_size=32),
               staging_dir=str(tmp_path / "st"), progress=False)
    endpoint = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=endpoint, scheme="http")
    paths = [f"avmoe-test/shards/ave-ray/{s['name']}" for s in res.manifest["shards"]]
    rows = ray.data.read_webdataset(paths, filesystem=fs, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == res.manifest["shards"][0]["keys"]
    assert all(len(json.loads(r["json"])["segment_labels"]) == 10 for r in rows)
