"""Backbone weight files are never unpickled: a crafted .pth/.ckpt cannot run code, the
metadata real checkpoints carry (timm train args, Lightning callbacks / hyper-parameters, yacs
configs) loads as inert data, anything else is refused with a named error saying how to
convert the file; safetensors loads."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_model_backbones import _official_htsat_checkpoint, _randomize  # noqa: E402

from avmoe.config import tiny_audio  # noqa: E402
from avmoe.models.backbones import HTSAT, WeightLoadError, read_state_dict  # noqa: E402
from avmoe.models.backbones.weights import UnsafeWeightsError  # noqa: E402


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("where", ["top", "state_dict", "hyper_parameters"])
@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_crafted_checkpoint_does_not_run_its_payload(tmp_path, where, fmt):
    marker = tmp_path / "marker"
    sd = HTSAT(tiny_audio()).state_dict()
    if where == "top":
        obj = _Payload(str(marker))
    elif where == "state_dict":
        obj = {"state_dict": {**sd, "evil": _Payload(str(marker))}}
    else:
        obj = {"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": _Payload(str(marker))}}
    path = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    if fmt == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(UnsafeWeightsError) as err:
        HTSAT(tiny_audio(weights=str(path)))
    assert not marker.exists(), "the payload ran"
    msg = str(err.value)
    assert str(path) in msg and "safetensors" in msg and "never unpickles" in msg
    assert f"{path}.safetensors" in msg
    with pytest.raises(UnsafeWeightsError):
        read_state_dict(path)
    assert not marker.exists()


def _lightning_159_checkpoint(model: HTSAT) -> dict:
    """What PyTorch Lightning 1.5.9 (HTS-AT's pin) writes for the official training script:
    callbacks keyed by their ``state_key`` strings, AdamW + LambdaLR states."""
    ckpt = _official_htsat_checkpoint(model)
    w = next(iter(ckpt["state_dict"].values()))
    key = ("ModelCheckpoint{'monitor': 'mAP', 'mode': 'max', 'every_n_train_steps': 0, "
           "'every_n_epochs': 1, 'train_time_interval': None, 'save_on_train_epoch_end': True}")
    ckpt.update({
        "pytorch-lightning_version": "1.5.9",
        "callbacks": {key: {"monitor": "mAP", "best_model_score": torch.tensor(0.47),
                            "best_model_path": "/workspace/checkpoints/l-epoch=7.ckpt",
                            "current_score": torch.tensor(0.47), "dirpath": "/workspace/checkpoints"}},
        "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros_like(w),
                                            "exp_avg_sq": torch.zeros_like(w)}},
                              "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                                "weight_decay": 0.05, "amsgrad": False,
                                                "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": 7, "_step_count": 8,
                           "verbose": False, "_get_lr_called_within_step": False,
                           "_last_lr": [1e-3], "lr_lambdas": [None]}],
    })
    return ckpt


def _fake_module(monkeypatch, dotted: str) -> types.ModuleType:
    """A module importable by name only while the checkpoint is written (the loader must never
    need it)."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    return sys.modules[dotted]


def test_real_checkpoint_metadata_loads_as_inert_data(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = HTSAT(tiny_audio())
    _randomize(src, 3)
    # Lightning 1.5.9, as HTS-AT's released checkpoint: no allow-listing needed at all
    torch.save(_lightning_159_checkpoint(src), tmp_path / "pl159.ckpt")
    ours = HTSAT(tiny_audio(weights=str(tmp_path / "pl159.ckpt")))
    for k, v in src.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k

    # older Lightning: callbacks keyed by class, hyper-parameters as an AttributeDict; a timm
    # train.py checkpoint's argparse.Namespace; a Swin training checkpoint's yacs CfgNode
    parsing = _fake_module(monkeypatch, "pytorch_lightning.utilities.parsing")
    callbacks = _fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint")
    yacs = _fake_module(monkeypatch, "yacs.config")
    ran = []

    class AttributeDict(dict):
        def __setstate__(self, state):  # the real classes' code must never run on load
            ran.append("AttributeDict")

    class ModelCheckpoint:
        pass

    class CfgNode(dict):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.__dict__["__immutable__"] = False

    for mod, cls in ((parsing, AttributeDict), (callbacks, ModelCheckpoint), (yacs, CfgNode)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    ckpt = _lightning_159_checkpoint(src)
    ckpt["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}
    ckpt["hyper_parameters"] = AttributeDict(lr=1e-3, classes_num=527)
    ckpt["args"] = argparse.Namespace(model="htsat", lr=1e-3)
    ckpt["config"] = CfgNode({"MODEL": CfgNode({"TYPE": "swinv2"})})
    torch.save(ckpt, tmp_path / "pl14.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing",
                 "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "yacs", "yacs.config"):
        monkeypatch.delitem(sys.modules, name)  # nothing of Lightning / yacs is importable now
    ours = HTSAT(tiny_audio(weights=str(tmp_path / "pl14.ckpt")))
    for k, v in src.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert not ran
    # without the allow-list, torch's own safe loader refuses the file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "pl14.ckpt", weights_only=True)


def test_safetensors_and_unreadable_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = HTSAT(tiny_audio())
    _randomize(src, 4)
    flat = {k: v.contiguous() for k, v in _official_htsat_checkpoint(src)["state_dict"].items()}
    save_file(flat, str(tmp_path / "htsat.safetensors"))
    ours = HTSAT(tiny_audio(weights=str(tmp_path / "htsat.safetensors")))
    for k, v in src.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightLoadError, match=r"garbage\.pth: not a readable torch\.save"):
        read_state_dict(tmp_path / "garbage.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(WeightLoadError, match=r"bad\.safetensors: not a readable safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
