"""GroupViT-style blocks of MGN (Mo & Tian 2022), as used by the DG-SCT/AVMoE AVVP head.

* :class:`AttnBlock`: pre-norm ViT block (fused qkv, GELU MLP x4, DropPath).
* :class:`CrossAttnBlock` (post_norm): groups attend to tokens, MLP, then LayerNorm.
* :class:`AssignAttention`: single-head assignment of tokens to groups; the softmax is over the
  *groups* axis (soft), hard-argmax with straight-through (hard), or Gumbel + straight-through
  in training (gumbel); then normalised over tokens by (sum + 1). Its "soft" map for the frame
  predictions is 1 + softmax_tokens(softmax_groups(logits)), as in the code.
* :class:`GroupingBlock`: token-MLP over the group axis (S1 -> S2), cross-attention of the
  projected groups over the tokens, assignment, + MLP(dim -> 4 dim -> dim).
* :class:`ModalityTrans`: blocks on [x ; group tokens], split, optional HAN-style grouping
  (other-modality segment tokens attend over x and replace it; hard/gumbel assignment), then the
  grouping block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn


class Mlp(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim or in_dim))


class Attention(nn.Module):
    """Multi-head attention with separate or fused q/k/v projections."""

    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim) if fused else None
        if not fused:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        if self.qkv is not None:
            q, k, v = self.qkv(query).chunk(3, dim=-1)
        else:
            key = query if key is None else key
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(key)
        q, k, v = self._split(q), self._split(k), self._split(v)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class AttnBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, fused=True)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """Post-norm cross-attention block (GroupViT ``CrossAttnBlock(post_norm=True)``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = Attention(dim, heads, fused=False)
        self.norm2, self.norm_post = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


def _straight_through(soft: torch.Tensor, dim: int) -> torch.Tensor:
    index = soft.argmax(dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


class AssignAttention(nn.Module):
    def __init__(self, dim: int, hard: bool, gumbel: bool, assign_eps: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.scale = dim ** -0.5
        self.hard, self.gumbel, self.eps, self.tau = hard, gumbel, assign_eps, tau

    def _assign(self, logits: torch.Tensor, hard: bool, gumbel: bool) -> torch.Tensor:
        dim = -2  # softmax over the groups
        if gumbel and self.training:
            g = -torch.empty_like(logits).exponential_().log()
            soft = ((logits + g) / self.tau).softmax(dim)
        else:
            soft = logits.softmax(dim)
        return _straight_through(soft, dim) if hard else soft

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """query (B, S, C) groups, key (B, N, C) tokens -> (B, S, C), {"hard", "soft"} (B, S, N)."""
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(key)
        raw = (q @ k.transpose(-2, -1)) * self.scale  # (B, S, N)
        attn = self._assign(raw, self.hard, self.gumbel)
        maps = {"hard": attn, "soft": 1.0 + self._assign(raw, False, False).softmax(-1)}
        attn = attn / (attn.sum(-1, keepdim=True) + self.eps)
        return self.proj(attn @ v), maps


class GroupingBlock(nn.Module):
    def __init__(self, dim: int, heads: int, num_group_tokens: int, num_output_groups: int,
                 hard: bool, gumbel: bool):
        super().__init__()
        self.norm_tokens, self.norm_x = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_tokens, dim // 2, num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, heads)
        self.assign = AssignAttention(dim, hard=hard, gumbel=gumbel)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        groups, x = self.norm_tokens(groups), self.norm_x(x)
        projected = self.norm_post_tokens(self.mlp_inter(groups.transpose(1, 2)).transpose(1, 2))
        projected = self.pre_assign_attn(projected, x)
        new_x, maps = self.assign(projected, x)
        new_x = new_x + projected
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), maps


class ModalityTrans(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, drop_path: float, num_groups: int,
                 hard: bool, han_tokens: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(AttnBlock(dim, heads, drop_path) for _ in range(depth))
        self.num_groups = num_groups
        # the code passes hard = gumbel = not hard_assignment to the HAN block
        self.han = (GroupingBlock(dim, heads, han_tokens, han_tokens, hard=not hard, gumbel=not hard)
                    if han_tokens else None)
        self.grouping = GroupingBlock(dim, heads, num_groups, num_groups, hard=hard, gumbel=hard)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor, x_other: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        groups = group_tokens.expand(x.shape[0], -1, -1)
        cat = torch.cat([x, groups], dim=1)
        for blk in self.blocks:
            cat = blk(cat)
        x, groups = cat[:, :-self.num_groups], cat[:, -self.num_groups:]
        if self.han is not None and x_other is not None:
            x, _ = self.han(x, x_other)
        return self.grouping(x, groups)
