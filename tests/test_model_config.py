"""Typed configs, presets and overrides (avmoe/config.py, Task.config)."""

from __future__ import annotations

import pytest

from avmoe.config import AVSConfig, AdapterConfig, apply_overrides
from avmoe.tasks import TASKS, get_task


def test_registry_and_presets():
    assert TASKS.names() == ["ave", "avqa", "avs", "avvp"]
    for name in TASKS.names():
        for preset in ("tiny", "paper", "official"):
            cfg = get_task(name).config(preset=preset)
            assert cfg.task == name and cfg.preset == preset
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(KeyError, match="unknown preset 'huge'"):
        get_task("ave").config(preset="huge")


def test_override_forms():
    task = get_task("ave")
    cfg = task.config(preset="tiny", lr=1e-2)  # unique leaf in a nested config (optim.lr)
    assert cfg.optim.lr == 1e-2
    cfg = task.config(preset="tiny", **{"adapter.num_tokens": 7}, adapter__reduction=2)
    assert (cfg.adapter.num_tokens, cfg.adapter.reduction) == (7, 2)
    cfg = task.config(preset="tiny", adapter={"num_cma": 2, "num_ua": 0}, num_segments=6)
    assert (cfg.adapter.num_cma, cfg.adapter.num_ua, cfg.num_segments) == (2, 0, 6)
    cfg = task.config(preset="tiny", router_hidden=[8])  # list -> tuple
    assert cfg.adapter.router_hidden == (8,)


def test_unknown_and_ambiguous_keys_name_themselves():
    task = get_task("ave")
    with pytest.raises(KeyError, match="unknown config key 'num_tokenz'"):
        task.config(preset="tiny", num_tokenz=3)
    with pytest.raises(KeyError, match="'adapter.bogus'|no field 'bogus'"):
        task.config(preset="tiny", **{"adapter.bogus": 1})
    with pytest.raises(KeyError, match="ambiguous config key 'weights'"):  # visual.weights / audio.weights
        task.config(preset="tiny", weights="x.pth")


def test_validation():
    with pytest.raises(ValueError, match="adapter.kind"):
        get_task("ave").config(preset="tiny", kind="mystery")
    with pytest.raises(ValueError, match="ua_variant"):
        apply_overrides(AdapterConfig(), {"ua_variant": "v3"})
    with pytest.raises(ValueError, match="setting"):
        get_task("avs").config(preset="tiny", setting="s5")


def test_avs_setting_selects_preset_variant():
    s4 = get_task("avs").config(preset="paper")
    ms3 = get_task("avs").config(preset="paper", setting="ms3")
    assert isinstance(ms3, AVSConfig) and ms3.setting == "ms3"
    assert (s4.adapter.reduction, s4.adapter.lb_weight, s4.gamma, s4.avm_weight) == (8, 0.0, 0.05, 0.0)
    assert (ms3.adapter.reduction, ms3.adapter.lb_weight, ms3.gamma, ms3.avm_weight) == (2, 0.01, 0.1, 0.5)
    assert (s4.optim.lr, ms3.optim.lr, ms3.optim.grad_accum) == (3e-4, 1.5e-4, 1)
    official = get_task("avs").config(preset="official")
    assert (official.adapter.num_cma, official.adapter.ua_variant, official.adapter.num_skip) == (1, "v1", 1)


def test_optimizer_defaults_from_spec():
    d = get_task("ave").optimizer_defaults(get_task("ave").config(preset="paper"))
    assert d["optimizer"] == "adam" and d["lr"] == 5e-4 and d["weight_decay"] == 0.0
    assert d["scheduler"] == {"name": "step", "step_size": 3, "gamma": 0.35}
    assert (d["epochs"], d["grad_accumulation"], d["batch_size"]) == (50, 8, 2)
    d = get_task("avvp").optimizer_defaults(get_task("avvp").config(preset="paper"))
    assert (d["lr"], d["scheduler"]["step_size"], d["epochs"], d["batch_size"]) == (3e-4, 10, 40, 1)
    d = get_task("avs").optimizer_defaults(get_task("avs").config(preset="paper"))
    assert d["scheduler"] == {"name": "none"} and d["primary_metric"] == "miou"
    d = get_task("avqa").optimizer_defaults(get_task("avqa").config(preset="paper"))
    assert (d["lr"], d["scheduler"]["step_size"], d["early_stop"], d["primary_metric"]) == (1e-4, 8, 5, "Overall")
