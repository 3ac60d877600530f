"""``python -m avmoe.export``: the adapters of a ZeRO-2 and of a ZeRO-3 checkpoint (the latter
consolidated by DeepSpeed's own zero_to_fp32, every file read ``weights_only=True``), the
round trip ``task.build_model(cfg)`` + ``load_adapters``, and the errors."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import base_config, latest_checkpoint, shards  # noqa: E402

from avmoe.export import adapter_keys, load_adapters, main, model_from_config, model_from_export, read_metadata  # noqa: E402
from avmoe.train import Trainer  # noqa: E402
from avmoe.train import checkpoint as ckpt_io  # noqa: E402


class GatherAtTheEnd(Trainer):
    """After the last step, every rank gathers the partitioned ZeRO-3 parameters (a collective)
    and rank 0 writes the trainable ones: what the engine itself holds, for the export to equal."""

    def after_step(self):
        if self.state.step != 2:
            return
        import deepspeed

        params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if self.rank == 0:
                torch.save({n: p.detach().clone() for n, p in params},
                           os.path.join(self.tcfg.paths.storage, "z3-gathered.pt"))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, ray_local):
    """The same 2-worker AVE run (seed, data, 2 steps) under ZeRO-2 and ZeRO-3."""
    from avmoe.train import fit, prepare

    data = shards(tmp_path_factory, "ave", 8)
    storage = str(tmp_path_factory.mktemp("export-runs"))
    for stage in (2, 3):
        fit(prepare(base_config("ave", data, storage, f"z{stage}", zero_stage=stage, test=False, batch_size=1,
                                limit_train_batches=2, tracking="none")), prepared=True,
            trainer_cls=GatherAtTheEnd if stage == 3 else None)
    return storage


def test_export_round_trips_from_zero2_and_zero3(zero_runs, tmp_path, capsys):
    z2, z3 = (os.path.join(zero_runs, f"z{s}") for s in (2, 3))
    assert main([z2, "--out", str(tmp_path / "z2.safetensors")]) == 0
    assert "exported" in capsys.readouterr().out
    assert main([z3, "--out", str(tmp_path / "z3.safetensors")]) == 0
    meta = read_metadata(str(tmp_path / "z3.safetensors"))
    assert meta["avmoe.task"] == "ave" and meta["avmoe.zero_stage"] == "3"

    # ZeRO-2: the export is exactly the checkpoint's trainable weights
    saved = ckpt_io.trainable_state(latest_checkpoint(z2))
    task, cfg, model = model_from_export(str(tmp_path / "z2.safetensors"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(torch.equal(p, saved[n]) for n, p in trainable.items())
    # only adapters, router and head: no frozen backbone tensor
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "z2.safetensors"))
    assert set(exported) == set(adapter_keys(model))
    assert all(k.startswith(("trunk.adapters.", "head.")) for k in exported)
    assert not any(n in exported for n, p in model.named_parameters() if not p.requires_grad)

    # ZeRO-3, consolidated: exactly the parameters the engine held (gathered in the run itself),
    # and close to the ZeRO-2 run's (the same training but for the partitioning's reduction order)
    z3_sd = load_file(str(tmp_path / "z3.safetensors"))
    assert set(z3_sd) == set(exported)
    gathered = torch.load(os.path.join(zero_runs, "z3-gathered.pt"), weights_only=True)
    assert gathered and all(torch.equal(z3_sd[k], v) for k, v in gathered.items())
    for k in exported:
        torch.testing.assert_close(z3_sd[k], exported[k], rtol=1e-3, atol=1e-3)

    # round trip: a fresh build of the config + load_adapters = the trained model's outputs
    _, _, fresh = model_from_config(__import__("json").loads(meta["avmoe.train_config"]))
    load_adapters(fresh, str(tmp_path / "z3.safetensors"))
    batch = task.example_batch(cfg, batch_size=2)
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(batch), fresh(batch)
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_export_errors(zero_runs, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    bad = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not an avmoe adapter export"):
        read_metadata(str(bad))
    # a model of another config refuses the file, naming the mismatch
    assert main([os.path.join(zero_runs, "z2"), "--out", str(tmp_path / "z2.safetensors")]) == 0
    from avmoe.tasks import get_task

    other = get_task("ave").build_model(get_task("ave").config("tiny", num_segments=10, num_classes=5))
    with pytest.raises(ValueError, match="shapes differ|does not fit"):
        load_adapters(other, str(tmp_path / "z2.safetensors"))


def test_official_key_map_is_one_to_one_and_round_trips():
    """The official AVMoE AVE names (avmoe.official_keys): every exported key of the official AVE
    preset maps to a distinct official key; the adapted blocks are renumbered (b0, b1, b4..b9 ->
    0..7); the 1x1 convolutions gain their size-1 dimensions; converting back restores ours."""
    from test_params import build_meta

    from avmoe.export import adapter_keys
    from avmoe.official_keys import convert_official, official_names, to_official

    model, cfg = build_meta("ave", "official")
    keys = adapter_keys(model)
    names = official_names(keys, cfg.adapter.num_cma)
    assert len(set(names.values())) == len(keys) == 1584  # 1200 trainable + 384 BatchNorm buffers
    assert names["trunk.adapters.b4_p1_visual.experts.0.compress.latents"] == \
        "vis_moe_adapter_blocks_p1.2.multimodal_experts.0.my_tokens"
    assert names["trunk.adapters.b9_p2_audio.experts.1.bottleneck.down.weight"] == \
        "audio_moe_adapter_blocks_p2.7.singlemodal_experts.0.down_sampler.weight"
    assert names["head.is_event.weight"] == "CMBS.localize_module.classifier.weight"
    assert names["head.temporal_attn.video_decoder.ffn.3.bias"] == "temporal_attn.video_decoder.decoder.layers.0.linear2.bias"
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(tuple(v.shape), generator=g) for k, v in model.state_dict().items() if k in set(keys)}
    official = to_official(state, cfg.adapter.num_cma)
    tok = "trunk.adapters.b0_p1_audio.bridge.token_map.weight"
    assert official[names[tok]].shape == (*state[tok].shape, 1, 1)
    back = convert_official(official, list(model.state_dict()), cfg.adapter.num_cma)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(KeyError, match="only the AVE task"):
        official_names(["head.fc_prob.weight"], 1)


def test_export_with_official_keys(zero_runs, tmp_path):
    out = str(tmp_path / "official.safetensors")
    assert main([os.path.join(zero_runs, "z2"), "--out", out, "--official-keys"]) == 0
    from safetensors.torch import load_file

    sd = load_file(out)
    assert any(k.startswith("vis_moe_adapter_blocks_p1.0.") for k in sd) and "CMBS.localize_module.classifier.weight" in sd
    assert not any(k.startswith(("trunk.", "head.")) for k in sd)
    with pytest.raises(ValueError, match="official AVMoE key names"):
        _, _, model = model_from_config(__import__("json").loads(read_metadata(out)["avmoe.train_config"]))
        load_adapters(model, out)
