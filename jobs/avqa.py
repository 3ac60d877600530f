#!/usr/bin/env python3
"""AVQA job: train the AVQA model on Ray Train + DeepSpeed from shards at a URL.

    python jobs/avqa.py                                    # embedded default: synthetic data, tiny preset, 2 CPU workers
    python jobs/avqa.py --data s3://bucket/shards/avqa --storage s3://bucket/runs --preset paper \
        --workers 4 --gpus-per-worker 1 --zero-stage 2 --name avqa-paper-1
    ray job submit --working-dir . -- python jobs/avqa.py --data ...
    python jobs/avqa.py --eval-only RUNS/NAME/CHECKPOINT --eval-drop audio

Flags and key=value overrides: `python jobs/avqa.py --help`; README "Training jobs".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir wins

from avmoe.train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("avqa", sys.argv[1:]))
