#!/usr/bin/env python3
"""AVE job: train the AVE model on Ray Train + DeepSpeed from shards at a URL.

    python jobs/ave.py                                    # embedded default: synthetic data, tiny preset, 2 CPU workers
    python jobs/ave.py --data s3://bucket/shards/ave --storage s3://bucket/runs --preset paper \
        --workers 4 --gpus-per-worker 1 --zero-stage 2 --name ave-paper-1
    ray job submit --working-dir . -- python jobs/ave.py --data ...
    python jobs/ave.py --eval-only RUNS/NAME/CHECKPOINT --eval-drop audio

Flags and key=value overrides: `python jobs/ave.py --help`; README "Training jobs".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir wins

from avmoe.train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("ave", sys.argv[1:]))
