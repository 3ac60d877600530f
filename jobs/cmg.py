#!/usr/bin/env python3
"""CMG job: pre-train the unified discrete audio-visual code space, or run a cross-modal
generalisation protocol with a pre-trained encoder, on Ray Train + DeepSpeed.

    python jobs/cmg.py                                    # embedded default: synthetic data, pre-training, then
                                                          # AVE / AVVP / AVE->AVVP in both directions, one table
    python jobs/cmg.py --data s3://bucket/shards/vggsound-avel --storage s3://bucket/runs --name cmg-pre
    python jobs/cmg.py --stage downstream --protocol ave --direction v2a \
        --pretrained s3://bucket/runs/cmg-pre --data s3://bucket/shards/ave --storage s3://bucket/runs
    python jobs/cmg.py --stage downstream --protocol ave_avvp --direction a2v --pretrained RUN \
        --data AVE_SHARDS --eval-data AVVP_SHARDS
    ray job submit --working-dir . -- python jobs/cmg.py --data ...

Flags and key=value overrides: `python jobs/cmg.py --help`; README "CMG".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir wins

from avmoe.train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("cmg", sys.argv[1:]))
