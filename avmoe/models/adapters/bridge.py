"""The modality bridge: guide tokens Y (B, N_y, D_y) -> the self stream's shape (B, N_x, D_x).

Spec §2.2. Three token-count mappings, followed by the same Linear(D_y -> D_x):

* ``"dense"`` (official): Ỹ = M·Y + b with a learnable M (N_x x N_y) and b (N_x), i.e. the
  code's 1x1 Conv2d over the token axis, written as a Linear over that axis (same parameter
  count, same default init: Kaiming-uniform with fan_in = N_y). ~9.4 M parameters per stage-0
  adapter of the paper model, the bulk of AVMoE's trainable parameters.
* ``"pool"`` (parameter-light): the token grid is resampled to the self grid, area-averaged
  when shrinking (adaptive average pooling) and bilinearly interpolated when growing.
* ``"linear"``: no token mapping at all (N_y tokens kept); every expert and the router work
  with any guide token count, so this is the lightest option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StreamSpec:
    """Width and token grid of one modality stream at one paired block."""

    dim: int
    hw: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.hw[0] * self.hw[1]


def resample_tokens(y: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) on grid ``src`` -> (B, H*W, D) on grid ``dst``."""
    if tuple(src) == tuple(dst):
        return y
    b, _, d = y.shape
    grid = y.transpose(1, 2).reshape(b, d, *src)
    if dst[0] <= src[0] and dst[1] <= src[1]:
        grid = F.adaptive_avg_pool2d(grid, dst)
    else:
        grid = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class ModalityBridge(nn.Module):
    def __init__(self, x: StreamSpec, y: StreamSpec, mode: str = "dense"):
        super().__init__()
        if mode not in ("dense", "pool", "linear"):
            raise ValueError(f"bridge mode must be dense, pool or linear, got {mode!r}")
        self.mode, self.x_hw, self.y_hw = mode, x.hw, y.hw
        self.token_map = nn.Linear(y.tokens, x.tokens) if mode == "dense" else None
        self.dim_map = nn.Linear(y.dim, x.dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.token_map is not None:
            y = self.token_map(y.transpose(1, 2)).transpose(1, 2)
        elif self.mode == "pool":
            y = resample_tokens(y, self.y_hw, self.x_hw)
        return self.dim_map(y)
