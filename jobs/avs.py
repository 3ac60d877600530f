#!/usr/bin/env python3
"""AVS job (AVSBench S4 / MS3): train the segmentation model on Ray Train + DeepSpeed.

    python jobs/avs.py --setting s4                      # embedded default: synthetic S4, tiny preset, 2 CPU workers
    python jobs/avs.py --setting ms3 --data s3://bucket/shards/avs-ms3 --storage s3://bucket/runs \
        --preset paper --workers 4 --gpus-per-worker 1 --zero-stage 2
    ray job submit --working-dir . -- python jobs/avs.py --setting ms3 --data ...

Flags and key=value overrides: `python jobs/avs.py --help`; README "Training jobs".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir wins

from avmoe.train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("avs", sys.argv[1:]))
