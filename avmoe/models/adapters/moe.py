"""The AVMoE adapter: bridge + router + dense mixture of CMA and UA experts (spec §2.2-§2.3).

out = Σ_e w_e(X, Ŷ) · Expert_e(X, Ŷ) per frame, and the adapter's load-balancing term
(``adapter.lb_form``: the official −Σ_e log mean_frames w_e by default, see ``load_balance_loss``). The trunk adds ``out`` to the self stream's residual.
"""

from __future__ import annotations

import torch
from torch import nn

from avmoe.config import AdapterConfig
from avmoe.models.adapters.bridge import ModalityBridge, StreamSpec
from avmoe.models.adapters.experts import CrossModalExpert, UnimodalExpert
from avmoe.models.adapters.router import Router, load_balance_loss
from avmoe.models.registries import ADAPTERS


@ADAPTERS.register("moe")
class MoEAdapter(nn.Module):
    def __init__(self, x: StreamSpec, y: StreamSpec, cfg: AdapterConfig, gate: bool):
        super().__init__()
        self.bridge = ModalityBridge(x, y, cfg.bridge)
        self.experts = nn.ModuleList(
            [CrossModalExpert(x.dim, cfg, gate) for _ in range(cfg.num_cma)]
            + [UnimodalExpert(x.dim, cfg, gate) for _ in range(cfg.num_ua)]
        )
        self.router = Router(2 * x.dim, len(self.experts), cfg.router_hidden, cfg.router_noise)
        self.lb_form = cfg.lb_form

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T_x, D_x) self tokens, y (N, T_y, D_y) raw guide tokens -> residual, lb."""
        y_hat = self.bridge(y)
        w = self.router(x.mean(1), y_hat.mean(1))  # (N, E)
        out = None
        for e, expert in enumerate(self.experts):  # accumulate: no (E, N, T, D) stack in memory
            term = w[:, e, None, None] * expert(x, y_hat)
            out = term if out is None else out + term
        return out, load_balance_loss(w, self.lb_form)
