"""Reading local weight files and loading them with errors that name the offending keys.

Weights only ever come from a local path the user gives (.pth / .pt / .ckpt / .bin or
.safetensors); nothing is downloaded, and nothing is ever unpickled: a ``torch.save`` file is
read with ``torch.load(weights_only=True)``, which builds tensors and plain containers only, so a
crafted file cannot run code. The metadata that real checkpoints carry beside their tensors is
allow-listed as inert data (``METADATA_GLOBALS``) and dropped; a file that needs any other
global is refused with ``UnsafeWeightsError``, which says how to convert it to safetensors.

What real checkpoints hold beside tensors (reasoned from their writers' source):

* timm: the released weights (Hugging Face ``model.safetensors`` / ``pytorch_model.bin``,
  GitHub-release ``.pth``) are bare state dicts; a checkpoint written by timm's ``train.py``
  (``CheckpointSaver``) also has ``args``, an ``argparse.Namespace``.
* Microsoft's Swin releases: ``{"model": state_dict, ...}``; a training checkpoint of that
  repository also has ``config``, a ``yacs.config.CfgNode``.
* The official HTS-AT ``HTSAT_AudioSet_Saved_1.ckpt``: a PyTorch Lightning 1.5.9 checkpoint
  (``epoch``, ``global_step``, ``pytorch-lightning_version``, ``state_dict``, ``callbacks``
  keyed by the callbacks' ``state_key`` strings with ModelCheckpoint's tensors and paths,
  ``optimizer_states``, ``lr_schedulers`` whose LambdaLR state stores ``lr_lambdas: [None]``):
  plain containers, tensors and strings, which ``weights_only=True`` loads with no help.
  Lightning < 1.5 keyed ``callbacks`` by the callback *class*, and ``save_hyperparameters()``
  stores an ``AttributeDict``: those names are allow-listed as inert stand-ins too.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import pickle
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


class WeightLoadError(RuntimeError):
    """A weight file does not fit the module (missing keys or shape mismatches)."""


class UnsafeWeightsError(WeightLoadError):
    """A ``torch.save`` file that cannot be read without unpickling arbitrary objects."""


class _InertMetadata:
    """Stand-in for a metadata global of a training checkpoint (a Lightning ``AttributeDict``
    or callback class, a yacs ``CfgNode``). Unpickling it creates a plain ``OrderedDict`` (the
    one container ``weights_only`` lets receive both items and attributes) and never imports or
    calls the real class; used as a dict key (old Lightning ``callbacks``) it is just a key."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


# Globals real checkpoints carry beside their tensors (see the module docstring), all dropped.
METADATA_GLOBALS: list = [argparse.Namespace, pathlib.PosixPath] + [
    (_InertMetadata, name) for name in (
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.fabric.utilities.data.AttributeDict",
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
        "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
        "pytorch_lightning.callbacks.progress.ProgressBar",
        "yacs.config.CfgNode",
    )]

CONVERT_HINT = (
    "avmoe never unpickles weight files (a crafted .pth/.ckpt runs its code when unpickled). "
    "If you trust this file, convert it once, outside avmoe, to safetensors (load it with "
    "unpickling allowed, keep the tensors of its state dict, save them with "
    "safetensors.torch.save_file; README 'Backbone weights' has the one-liner) and pass "
    "{path}.safetensors instead")


def _torch_load_safely(path: str):
    try:
        with torch.serialization.safe_globals(METADATA_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message wraps the cause ("WeightsUnpickler error: ...") in advice to unpickle
        detail = str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        detail = " ".join(detail.split()).split(" Please use", 1)[0]
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"PK" or magic[:1] == b"\x80":  # a torch.save zip or a raw pickle
            raise UnsafeWeightsError(f"{path}: refused, it holds objects other than tensors and "
                                     f"plain metadata ({detail}).\n"
                                     + CONVERT_HINT.format(path=path)) from None
        raise WeightLoadError(f"{path}: not a readable torch.save or safetensors weight file "
                              f"({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise WeightLoadError(f"{path}: not a readable torch.save or safetensors weight file "
                              f"({type(e).__name__}: {first})") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensor state dict from a local file; unwraps ``state_dict`` / ``model`` / ``module``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path} (weights are never downloaded)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: dict = load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightLoadError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        sd = _torch_load_safely(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightLoadError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _short(keys: Iterable[str], n: int = 12) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checked(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    what: str,
    optional: Iterable[str] = ("num_batches_tracked",),
    describe: Callable[[str], str] | None = None,
) -> None:
    """Load ``state_dict`` into ``module``; raise naming every missing key (whose name does
    not contain one of ``optional``) and every shape mismatch; log unexpected keys.
    ``describe`` renders a key for messages (e.g. with its name in the original checkpoint)."""
    own = module.state_dict()
    optional = tuple(optional)
    name = describe or (lambda k: k)
    missing = [name(k) for k in own if k not in state_dict and not any(o in k for o in optional)]
    mismatched = [
        f"{name(k)}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_short(mismatched)}")
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if problems:
        raise WeightLoadError(f"{what}: " + "; ".join(problems))
    if unexpected:
        log.warning("%s: ignoring unexpected keys: %s", what, _short(unexpected))
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
