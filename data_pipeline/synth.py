"""``synth``: small *learnable* synthetic datasets written in the official raw layouts.

Each class has a visual signature (a filled shape of a class colour at a class position) and
an audio signature (a tone at a class pitch); segments without an event show only noise and
carry only noise. Tests and the demo pack these with the real packer, so the real layout
readers are exercised. The generators are the datasets' ``synth`` hooks
(``data_pipeline/datasets/``), built from the signals of ``data_pipeline.synthetic``.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline.datasets import DATASETS, get_dataset, list_datasets


def synth(task: str, n: int, out: str, seed: int = 0, num_classes: int | None = None,
          size: int | None = None, videos: bool = False) -> str:
    """Write a synthetic dataset of ``task`` (a registered dataset name) under ``out``;
    returns ``out``."""
    if task not in DATASETS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(list_datasets())}")
    if n < 1:
        raise ValueError("--n must be at least 1")
    dataset = get_dataset(task)
    dataset.check_synth(videos)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = num_classes or 4
    dataset.synth(out, n, rng, min(k, dataset.synth_max_classes), size or 96, videos)
    return out
