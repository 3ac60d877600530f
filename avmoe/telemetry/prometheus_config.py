"""``cluster/monitoring/prometheus.yml`` for a Ray started with another ``--temp-dir`` or with
another avmoe file-SD directory (Prometheus configs have no variables):

    python -m avmoe.telemetry.prometheus_config --ray-temp-dir /mnt/ray --sd-dir /mnt/avmoe_sd > prometheus.yml
    prometheus --config.file=prometheus.yml

The template's Ray paths (``/tmp/ray/...``: Ray's service-discovery file of its nodes'
metrics) and avmoe's file-SD directory (``/tmp/avmoe/prometheus_sd``, ``AVMOE_METRICS_SD_DIR``)
are replaced; everything else is the template's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "cluster" / "monitoring" / "prometheus.yml"
RAY_TEMP, SD_DIR = "/tmp/ray", "/tmp/avmoe/prometheus_sd"


def render(template: str, ray_temp_dir: str = RAY_TEMP, sd_dir: str = SD_DIR) -> str:
    text = template.replace(SD_DIR, sd_dir.rstrip("/"))
    return text.replace(f"'{RAY_TEMP}/", f"'{ray_temp_dir.rstrip('/')}/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avmoe.telemetry.prometheus_config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ray-temp-dir", default=RAY_TEMP, help=f"Ray's --temp-dir (default {RAY_TEMP})")
    p.add_argument("--sd-dir", default=os.environ.get("AVMOE_METRICS_SD_DIR") or SD_DIR,
                   help=f"avmoe's file-SD directory (AVMOE_METRICS_SD_DIR; default {SD_DIR})")
    p.add_argument("--template", default=str(TEMPLATE), help="the template (default: cluster/monitoring/prometheus.yml)")
    args = p.parse_args(argv)
    print(render(Path(args.template).read_text(), args.ray_temp_dir, args.sd_dir), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
