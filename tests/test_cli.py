"""The data_pipeline CLI: --help for every verb, the console script, inspect's PNG."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

VERBS = ("synth", "pack", "verify", "inspect", "plan")


@pytest.mark.parametrize("verb", VERBS)
def test_help_for_every_verb(verb):
    out = subprocess.run([sys.executable, "-m", "data_pipeline", verb, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: data_pipeline " + verb)


def test_console_script_installed():
    exe = Path(sys.executable).with_name("data_pipeline")
    if not exe.exists():
        pytest.skip("package not installed into this environment (make venv installs it)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for verb in VERBS:
        assert verb in out


def test_synth_pack_inspect_png(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_pipeline", *a],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    run("synth", "--task", "avs-ms3", "--n", "2", "--out", str(tmp_path / "raw"), "--size", "48")
    out = run("pack", "--dataset", "avs-ms3", "--src", str(tmp_path / "raw"), "--split", "val",
              "--out", str(tmp_path / "sh"), "--frame-size", "32", "--shard-size", "1MiB",
              "--workers", "2")
    assert "packed avs-ms3 val: 2 samples" in out
    png = tmp_path / "s.png"
    text = run("inspect", str(tmp_path / "sh"), "--png", str(png))
    assert "dataset=avs-ms3" in text and "samples=2" in text
    img = Image.open(png)
    assert img.size[0] > 400 and img.size[1] > 300


def test_bad_size_argument():
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "pack", "--dataset", "ave",
                           "--src", ".", "--split", "train", "--out", "x", "--shard-size", "lots"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a size: 'lots'" in proc.stderr
