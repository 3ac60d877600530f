"""Reading local weight files and loading them with errors that name the offending keys.

Weights only ever come from a local path the user gives (.pth / .pt / .ckpt / .bin or
.safetensors); nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


class WeightLoadError(RuntimeError):
    """A weight file does not fit the module (missing keys or shape mismatches)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensor state dict from a local file; unwraps ``state_dict`` / ``model`` / ``module``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path} (weights are never downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: dict = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
            # Lightning checkpoints (HTS-AT) may pickle non-tensor objects; the file is a local
            # one the user named explicitly, so fall back to a full unpickle, loudly.
            log.warning("%s is not a plain tensor file (%s); loading it with weights_only=False",
                        path, type(e).__name__)
            sd = torch.load(path, map_location="cpu", weights_only=False)
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
