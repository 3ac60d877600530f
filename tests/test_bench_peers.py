"""bench/peers.py --smoke: every loader runs on the same tiny shards and the report is sane (the
figures themselves are a benchmark's, not a test's: bench/README.md "Peers")."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time

from tests.conftest import REPO


def test_peers_smoke(tmp_path):
    out = tmp_path / "peers.json"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "peers.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    took = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())["results"]
    assert {"ours", "wds-simplejpeg", "wds-pil", "raydata", "bare"} <= set(results)
    if importlib.util.find_spec("streaming") is not None:  # MosaicML Streaming (bench/requirements.txt)
        assert "mosaic" in results
    else:
        assert "mosaic: skipped" in proc.stdout

    bare = results["bare"][0]
    assert bare["n"] == bare["unique"] == 16
    for method, runs in results.items():
        for r in runs:
            for k in ("samples_per_s", "samples_per_cpu_s", "cpu_s", "first_batch_cold_s", "first_batch_warm_s",
                      "consumer_peak_rss_mib", "tree_peak_pss_mib"):
                assert r[k] > 0, (method, k, r[k])
            # every loader streamed exactly the bare loop's samples, ours included
            assert (r["n"], r["unique"], r["keys_sha"]) == (bare["n"], bare["unique"], bare["keys_sha"]), method
    # Ray's processes were found through the consumer's session directory, not only as its children
    for method in ("ours", "raydata"):
        assert results[method][0]["session_anchors"] >= 2, results[method][0]
        assert results[method][0]["cpu_by_kind"].get("ray workers", 0) > 0, results[method][0]["cpu_by_kind"]

    # the printed main table: one row per loader, every figure positive
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| loader | samples |"))
    rows = []
    for line in lines[head + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    assert len(rows) == len(results), proc.stdout
    for line in rows:
        numbers = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", line.split("|", 2)[2])]
        assert numbers and all(x > 0 for x in numbers), line
    assert "| goal (issue 16)" in proc.stdout
    print(f"bench/peers.py --smoke took {took:.0f} s")
