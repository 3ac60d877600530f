"""Typed configs, presets, the override grammar (avmoe/config.py) and the task registry."""

from __future__ import annotations

import pytest

from avmoe.config import AdapterConfig, ConfigError, OptimConfig, apply_overrides
from avmoe.models.heads.avs import AVSConfig
from avmoe.tasks import PRESETS, TASKS, get_task, list_tasks, task_variants
from data_pipeline.datasets import list_datasets


def test_registry_and_presets():
    assert list_tasks() == TASKS.names() and len(list_tasks()) >= 4
    for name in task_variants():
        task = get_task(name)
        assert task.full_name == name and task.dataset in list_datasets()
        for preset in PRESETS:
            cfg = task.config(preset=preset)
            assert set(task.split_datasets(cfg).values()) <= set(list_datasets())
            assert cfg.task == task.name and cfg.preset == preset
            opt = task.training_defaults(preset)
            opt.validate()
            opt.check_complete()
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(KeyError, match="unknown task 'avs-s5'"):
        get_task("avs-s5")
    with pytest.raises(KeyError, match="unknown preset 'huge'"):
        get_task("ave").config(preset="huge")


def test_override_forms():
    task = get_task("ave")
    cfg = task.config(preset="tiny", num_tokens=7)  # unique leaf in a nested config (adapter.num_tokens)
    assert cfg.adapter.num_tokens == 7
    cfg = task.config(preset="tiny", **{"adapter.num_tokens": 7}, adapter__reduction=2)
    assert (cfg.adapter.num_tokens, cfg.adapter.reduction) == (7, 2)
    cfg = task.config(preset="tiny", adapter={"num_cma": 2, "num_ua": 0}, num_segments=6)
    assert (cfg.adapter.num_cma, cfg.adapter.num_ua, cfg.num_segments) == (2, 0, 6)
    cfg = task.config(preset="tiny", router_hidden=[8])  # list -> tuple
    assert cfg.adapter.router_hidden == (8,)
    # text (the command line) is parsed by the field's type, the same grammar everywhere
    cfg = task.config(preset="tiny", num_tokens="5", attn_scale="true", adapted_stages="[0, 2]",
                      **{"visual.weights": "none", "adapter.lb_weight": "0.5"})
    assert (cfg.adapter.num_tokens, cfg.adapter.attn_scale, cfg.adapter.adapted_stages) == (5, True, (0, 2))
    assert cfg.visual.weights is None and cfg.adapter.lb_weight == 0.5
    # a choice spelled like a keyword is the choice: "none" is the Literal, not None
    assert task.config(preset="tiny", ua_variant="none").adapter.ua_variant == "none"
    assert apply_overrides(OptimConfig(), {"scheduler": "none"}).scheduler == "none"
    assert apply_overrides(OptimConfig(), {"scheduler": "null"}).scheduler is None


def test_unknown_ambiguous_and_mistyped_keys_name_themselves():
    task = get_task("ave")
    with pytest.raises(KeyError, match="unknown config key 'num_tokenz'"):
        task.config(preset="tiny", num_tokenz=3)
    with pytest.raises(KeyError, match="no field 'bogus'"):
        task.config(preset="tiny", **{"adapter.bogus": 1})
    with pytest.raises(KeyError, match="ambiguous config key 'weights'"):  # visual.weights / audio.weights
        task.config(preset="tiny", weights="x.pth")
    with pytest.raises(ConfigError, match="adapter.num_tokens must be int; got 'many'"):
        task.config(preset="tiny", num_tokens="many")
    with pytest.raises(ConfigError, match="adapter.use_bn must be bool"):
        task.config(preset="tiny", use_bn=3)


def test_validation_of_choices_and_rules():
    with pytest.raises(ValueError, match="adapter.kind must be one of 'moe', 'lavish', 'avpea', 'none'"):
        get_task("ave").config(preset="tiny", kind="mystery")
    with pytest.raises(ValueError, match="ua_variant"):
        apply_overrides(AdapterConfig(), {"ua_variant": "v3"})
    with pytest.raises(ValueError, match="num_cma \\+ num_ua >= 1"):
        apply_overrides(AdapterConfig(), {"num_cma": 0, "num_ua": 0})
    with pytest.raises(ValueError, match="map_sizes must have 4 entries"):
        get_task("avs").config(preset="tiny", map_sizes=(8, 4))
    # the variant is chosen by the task object, never as a model key
    with pytest.raises(ConfigError, match="setting: the variant chooses the preset"):
        get_task("avs").config(preset="tiny", setting="ms3")
    with pytest.raises(ConfigError, match="variants s4, ms3"):
        TASKS.get("avs")("s5")


def test_avs_variant_selects_preset():
    s4, ms3 = get_task("avs").config(preset="paper"), get_task("avs-ms3").config(preset="paper")
    assert get_task("avs").variant == "s4" and isinstance(ms3, AVSConfig)
    assert (s4.setting, ms3.setting) == ("s4", "ms3")
    assert (s4.adapter.reduction, s4.adapter.lb_weight, s4.gamma, s4.avm_weight) == (8, 0.0, 0.05, 0.0)
    assert (ms3.adapter.reduction, ms3.adapter.lb_weight, ms3.gamma, ms3.avm_weight) == (2, 0.01, 0.1, 0.5)
    d4, d3 = get_task("avs-s4").training_defaults("paper"), get_task("avs-ms3").training_defaults("paper")
    assert (d4.lr, d3.lr, d3.grad_accum, d3.epochs) == (3e-4, 1.5e-4, 1, 60)
    official = get_task("avs").config(preset="official")
    assert (official.adapter.num_cma, official.adapter.ua_variant, official.adapter.num_skip) == (1, "v1", 1)


def test_training_defaults_from_spec():
    d = get_task("ave").training_defaults("paper")
    assert (d.optimizer, d.lr, d.weight_decay) == ("adam", 5e-4, 0.0)
    assert (d.scheduler, d.step_size, d.gamma) == ("step", 3, 0.35)
    assert (d.epochs, d.grad_accum, d.batch_size, d.early_stop, d.seed) == (50, 8, 2, 20, 999)
    d = get_task("avvp").training_defaults("paper")
    assert (d.lr, d.step_size, d.epochs, d.batch_size) == (3e-4, 10, 40, 1)
    assert get_task("avs").training_defaults("paper").scheduler == "none"
    d = get_task("avqa").training_defaults("paper")
    assert (d.lr, d.step_size, d.early_stop) == (1e-4, 8, 5)
    # explicit values win, the rest stays the task's
    merged = d.merged(OptimConfig(lr=1e-3, epochs=2))
    assert (merged.lr, merged.epochs, merged.step_size, merged.seed) == (1e-3, 2, 8, 1)
    with pytest.raises(ConfigError, match="step_size: scheduler=step needs step_size"):
        get_task("avs").training_defaults("paper").merged(OptimConfig(scheduler="step")).check_complete()
