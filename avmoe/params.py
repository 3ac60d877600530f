"""Parameter accounting by component, built on the meta device (no memory, no weights).

    python -m avmoe.params --task ave --preset paper [--bridge pool] [--set k=v ...]
    python -m avmoe.params --task avs-ms3 --preset paper       # a task variant by its full name
    python -m avmoe.params --all --preset paper      # markdown table: every task x {dense, pool}

Components: frozen visual / audio backbones; adapter bridges split into the token-count map
(the official N_y -> N_x "1x1 conv") and the dimension map; routers; CMA and UA experts;
other adapter parameters (LAVisH / AV-PEA); the task head. "trainable" counts
``requires_grad`` parameters (adapters + head).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

COMPONENTS = ("visual backbone", "audio backbone", "bridge token map", "bridge dim map", "router",
              "CMA experts", "UA experts", "adapter (other)", "head")


def _component_prefixes(model: nn.Module) -> dict[str, str]:
    from avmoe.models.adapters import CrossModalExpert, ModalityBridge, Router, UnimodalExpert

    prefixes = {"trunk.visual": "visual backbone", "trunk.audio": "audio backbone",
                "trunk.adapters": "adapter (other)", "head": "head"}
    for name, m in model.named_modules():
        if isinstance(m, ModalityBridge):
            prefixes[f"{name}.token_map"] = "bridge token map"
            prefixes[f"{name}.dim_map"] = "bridge dim map"
        elif isinstance(m, Router):
            prefixes[name] = "router"
        elif isinstance(m, CrossModalExpert):
            prefixes[name] = "CMA experts"
        elif isinstance(m, UnimodalExpert):
            prefixes[name] = "UA experts"
    return prefixes


def count_parameters(model: nn.Module) -> "OrderedDict[str, tuple[int, int]]":
    """component -> (trainable, total); plus "total"."""
    prefixes = _component_prefixes(model)
    ordered = sorted(prefixes, key=len, reverse=True)
    counts: dict[str, list[int]] = {c: [0, 0] for c in COMPONENTS}
    counts["other"] = [0, 0]
    for name, p in model.named_parameters():
        comp = next((prefixes[k] for k in ordered if name == k or name.startswith(k + ".")), "other")
        counts[comp][0] += p.numel() if p.requires_grad else 0
        counts[comp][1] += p.numel()
    out = OrderedDict((c, (v[0], v[1])) for c, v in counts.items() if v[1])
    out["total"] = (sum(v[0] for v in out.values()), sum(v[1] for v in out.values()))
    return out


def build_meta(task_name: str, preset: str = "paper", **overrides: Any) -> tuple[nn.Module, Any]:
    from avmoe.tasks import get_task

    task = get_task(task_name)
    cfg = task.config(preset=preset, **overrides)
    with torch.device("meta"):
        model = task.build_model(cfg)
    return model, cfg


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}"


def format_table(counts: "OrderedDict[str, tuple[int, int]]") -> str:
    lines = [f"{'component':<20} {'trainable (M)':>14} {'total (M)':>12}"]
    lines += [f"{c:<20} {_m(t):>14} {_m(n):>12}" for c, (t, n) in counts.items()]
    return "\n".join(lines)


def _all_rows(preset: str) -> list[str]:
    from avmoe.tasks import task_variants

    rows = ["| task | bridge | adapters | of which token map | bridges (token + dim) | routers | CMA | UA "
            "| head | trainable | total |", "|" + "---|" * 11]
    for task in task_variants():
        for bridge in ("dense", "pool"):
            model, _ = build_meta(task, preset, bridge=bridge)
            c = count_parameters(model)
            g = lambda k: c.get(k, (0, 0))[0]  # noqa: E731
            adapters = sum(g(k) for k in COMPONENTS[2:8])
            rows.append(f"| {task} | {bridge} | {_m(adapters)} | {_m(g('bridge token map'))} | "
                        f"{_m(g('bridge token map') + g('bridge dim map'))} | {_m(g('router'))} | "
                        f"{_m(g('CMA experts'))} | {_m(g('UA experts'))} | {_m(g('head'))} | "
                        f"{_m(c['total'][0])} | {_m(c['total'][1])} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m avmoe.params", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="ave", help="a task or task-variant name (avmoe.tasks.task_variants())")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--bridge", choices=("dense", "pool", "linear"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--all", action="store_true", help="markdown table of every task and both bridges")
    args = ap.parse_args(argv)
    if args.all:
        print("\n".join(_all_rows(args.preset)))
        return
    overrides: dict[str, Any] = dict(kv.partition("=")[::2] for kv in args.set)  # text: typed by the config
    if args.bridge:
        overrides["bridge"] = args.bridge
    model, cfg = build_meta(args.task, args.preset, **overrides)
    print(f"task={args.task} preset={args.preset} bridge={cfg.adapter.bridge} adapter={cfg.adapter.kind}")
    print(format_table(count_parameters(model)))


if __name__ == "__main__":
    main()
