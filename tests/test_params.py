"""Every preset instantiates (paper / official on the meta device) and the parameter accounting
matches the analytic adapter budget of the released scripts (spec §2.8)."""

from __future__ import annotations

import pytest
import torch

from avmoe.params import COMPONENTS, build_meta, count_parameters, format_table, main
from avmoe.tasks import task_variants

ADAPTER_PARTS = COMPONENTS[2:8]

# (task, preset, overrides) -> (adapter params M, token-map params M) from spec §2.8
SPEC_BUDGET = [
    ("ave", "official", {}, 90.6, 76.4),
    ("avvp", "official", {}, 111.9, 81.2),
    ("avs-s4", "official", {}, 198.0, 81.2),  # S4 train script (v1 MHA UA)
    ("avs-s4", "paper", {"ua_variant": "v1"}, 166.0, 76.4),  # S4 test script
    ("avs-ms3", "official", {}, 108.0, 76.4),
    ("avqa", "official", {}, 110.0, 81.2),
]


def _adapter_params(counts) -> int:
    return sum(counts.get(k, (0, 0))[0] for k in ADAPTER_PARTS)


@pytest.mark.parametrize("task,preset,overrides,adapters_m,token_map_m", SPEC_BUDGET)
def test_official_budgets_match_spec(task, preset, overrides, adapters_m, token_map_m):
    model, _ = build_meta(task, preset, **overrides)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    assert _adapter_params(counts) / 1e6 == pytest.approx(adapters_m, abs=0.6)
    assert counts["bridge token map"][0] / 1e6 == pytest.approx(token_map_m, abs=0.1)
    assert counts["visual backbone"] == (0, counts["visual backbone"][1])  # frozen
    assert counts["visual backbone"][1] / 1e6 == pytest.approx(195.2, abs=0.1)  # Swin-V2-L without classifier
    assert counts["audio backbone"][0] == 0


@pytest.mark.parametrize("task", task_variants())
def test_paper_presets_on_meta_and_pool_bridge(task):
    dense, _ = build_meta(task, "paper")
    pool, _ = build_meta(task, "paper", bridge="pool")
    cd, cp = count_parameters(dense), count_parameters(pool)
    assert "bridge token map" not in cp
    assert cd["total"][0] - cp["total"][0] == cd["bridge token map"][0]
    assert cd["total"][0] == sum(v[0] for k, v in cd.items() if k != "total")


def test_cli_prints_a_table(capsys):
    main(["--task", "avqa", "--preset", "tiny", "--bridge", "pool"])
    out = capsys.readouterr().out
    assert "bridge=pool" in out and "trainable (M)" in out and "head" in out
    model, _ = build_meta("ave", "tiny")
    assert "total" in format_table(count_parameters(model))
    assert next(model.parameters()).device == torch.device("meta")
