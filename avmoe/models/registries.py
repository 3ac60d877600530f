"""timm-style name -> factory registries of the model parts.

* ``BACKBONES``: ``"swinv2"`` (visual), ``"htsat"`` (audio); factory(cfg) -> nn.Module.
* ``ADAPTERS``: ``"moe"``, ``"lavish"``, ``"avpea"``; factory(x_spec, y_spec, cfg, gate) ->
  nn.Module whose forward(x, y) returns (residual, load-balance loss or None).
* ``HEADS``: ``"ave"``, ``"avvp"``, ``"avs"``, ``"avqa"``; factory(cfg, trunk) -> nn.Module.
"""

from __future__ import annotations

from avmoe.registry import Registry

BACKBONES: Registry = Registry("backbone")
ADAPTERS: Registry = Registry("adapter")
HEADS: Registry = Registry("head")
