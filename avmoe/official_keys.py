"""Our AVE model's parameter names <-> the official AVMoE AVE code's (yingchengy/AVMOE
``AVE/nets/net_trans_v3.py`` ``MMIL_Net`` and ``nets/models.py``, run with ``AVE/train.sh``'s
flags), for ``python -m avmoe.export RUN --official-keys`` and back (``convert_official``).

With the ``official`` AVE preset the adapters, router and head are the same modules, so the map
is 1:1 up to names and three size-1 dimensions (checked by loading converted random official
weights into ours: outputs equal to float64 rounding, adapters and head). What differs:

* **adapter blocks**: ours name every paired block ``b0..b11`` (adapted or not); the official
  ``{audio|vis}_moe_adapter_blocks_{p1|p2}`` lists count only the adapted ones, in order (stages 0
  and 2 with ``num_skip=2``: ours b0, b1, b4..b9 = official 0..7);
* **inside an adapter**: ``bridge.token_map`` = ``conv_adapter`` (a 1x1 Conv2d: weight
  (N_x, N_y) -> (N_x, N_y, 1, 1)), ``bridge.dim_map`` = ``fc``, ``router.mlp.{0,2,4}`` =
  ``router.{0,2,4}``, our expert e < num_cma = ``multimodal_experts.e``, else
  ``singlemodal_experts.(e - num_cma)``; in an expert ``out_gate`` = ``gate``,
  ``compress.latents`` = ``my_tokens``, ``compress.gate`` = ``gate_av``, ``bottleneck.down/up``
  = ``down_sampler/up_sampler`` (grouped Conv1d (out, in/G, 1) -> Conv2d (out, in/G, 1, 1)),
  ``bottleneck.{bn1,bn2,ln_before,ln_post}`` keep their names;
* **head**: ours under ``head.``, the official under ``temporal_attn.`` and ``CMBS.`` (table
  ``HEAD_RULES``);
* official tensors without a counterpart (never used in its forward, never trained): the
  template layers its temporal encoder/decoder keep (``*_encoder.encoder_layer.*``,
  ``*_decoder.decoder_layer.*``) and the decoder layer's unused ``self_attn``. The frozen
  backbones (``swin.*``, ``htsat.*``) are not mapped: they come from the same pretrained files.
"""

from __future__ import annotations

import re

import torch

OFFICIAL_LIST = {("p1", "audio"): "audio_moe_adapter_blocks_p1", ("p1", "visual"): "vis_moe_adapter_blocks_p1",
                 ("p2", "audio"): "audio_moe_adapter_blocks_p2", ("p2", "visual"): "vis_moe_adapter_blocks_p2"}

ADAPTER_RULES = [
    (r"^bridge\.token_map\.(weight|bias)$", r"conv_adapter.\1"),
    (r"^bridge\.dim_map\.(weight|bias)$", r"fc.\1"),
    (r"^router\.mlp\.([024])\.(weight|bias)$", r"router.\1.\2"),
]
EXPERT_RULES = [
    (r"^out_gate$", "gate"),
    (r"^compress\.latents$", "my_tokens"),
    (r"^compress\.gate$", "gate_av"),
    (r"^bottleneck\.down\.weight$", "down_sampler.weight"),
    (r"^bottleneck\.up\.weight$", "up_sampler.weight"),
    (r"^bottleneck\.(bn1|bn2|ln_before|ln_post)\.(.*)$", r"\1.\2"),
]
HEAD_RULES = [
    (r"^head\.temporal_attn\.audio_proj\.(weight|bias)$", r"temporal_attn.a_fc.\1"),
    (r"^head\.temporal_attn\.visual_proj\.0\.(weight|bias)$", r"temporal_attn.v_fc.\1"),
    (r"^head\.temporal_attn\.(audio|visual)_rnn\.(.*)$", r"temporal_attn.audio_visual_rnn_layer.\1_rnn.\2"),
    (r"^head\.temporal_attn\.(audio|video)_encoder\.proj\.(weight|bias)$", r"temporal_attn.\1_encoder.affine_matrix.\2"),
    (r"^head\.temporal_attn\.(audio|video)_encoder\.encoder\.layers\.(\d+)\.(.*)$",
     r"temporal_attn.\1_encoder.encoder.layers.\2.\3"),
    (r"^head\.temporal_attn\.(audio|video)_decoder\.proj\.(weight|bias)$", r"temporal_attn.\1_decoder.affine_matrix.\2"),
    (r"^head\.temporal_attn\.(audio|video)_decoder\.cross_attn\.(.*)$",
     r"temporal_attn.\1_decoder.decoder.layers.0.multihead_attn.\2"),
    (r"^head\.temporal_attn\.(audio|video)_decoder\.ffn\.0\.(weight|bias)$",
     r"temporal_attn.\1_decoder.decoder.layers.0.linear1.\2"),
    (r"^head\.temporal_attn\.(audio|video)_decoder\.ffn\.3\.(weight|bias)$",
     r"temporal_attn.\1_decoder.decoder.layers.0.linear2.\2"),
    (r"^head\.temporal_attn\.(audio|video)_decoder\.(norm[12])\.(weight|bias)$",
     r"temporal_attn.\1_decoder.decoder.layers.0.\2.\3"),
    (r"^head\.temporal_attn\.(audio|video)_gate\.(weight|bias)$", r"temporal_attn.\1_gated.0.\2"),
    (r"^head\.(video|audio)_cas\.(weight|bias)$", r"CMBS.\1_cas.\2"),
    (r"^head\.is_event\.(weight|bias)$", r"CMBS.localize_module.classifier.\1"),
    (r"^head\.event_classifier\.(weight|bias)$", r"CMBS.localize_module.event_classifier.\1"),
]
_ADAPTER = re.compile(r"^trunk\.adapters\.b(\d+)_(p[12])_(audio|visual)\.(.*)$")


def _first(rules, name: str) -> str | None:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return None


def official_names(keys: list[str], num_cma: int) -> dict[str, str]:
    """Our state-dict keys (an AVE model's export) -> the official ``MMIL_Net`` keys.
    ``num_cma``: cross-modal experts per adapter (the rest are unimodal). KeyError names a key
    without an official counterpart (another task's head, a non-MoE adapter)."""
    adapted = sorted({int(m.group(1)) for k in keys if (m := _ADAPTER.match(k))})
    index = {b: i for i, b in enumerate(adapted)}  # the official lists count adapted blocks only
    out = {}
    for k in keys:
        m = _ADAPTER.match(k)
        if m:
            block, pos, mod, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            em = re.match(r"^experts\.(\d+)\.(.*)$", rest)
            if em:
                e, inner = int(em.group(1)), _first(EXPERT_RULES, em.group(2))
                kind = f"multimodal_experts.{e}" if e < num_cma else f"singlemodal_experts.{e - num_cma}"
                new = f"{kind}.{inner}" if inner else None
            else:
                new = _first(ADAPTER_RULES, rest)
            if new is None:
                raise KeyError(f"{k}: no counterpart in the official AVMoE adapter")
            out[k] = f"{OFFICIAL_LIST[(pos, mod)]}.{index[block]}.{new}"
            continue
        new = _first(HEAD_RULES, k)
        if new is None:
            raise KeyError(f"{k}: no counterpart in the official AVMoE AVE model (only the AVE task maps)")
        out[k] = new
    if len(set(out.values())) != len(out):
        raise AssertionError("the official key map is not one-to-one")
    return out


def to_official_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    """Our tensor in the official layout (1x1 convolutions carry trailing size-1 dimensions)."""
    if key.endswith(".bridge.token_map.weight"):
        return t[:, :, None, None]
    if re.search(r"\.bottleneck\.(down|up)\.weight$", key):
        return t[..., None]
    return t


def to_official(state: dict[str, torch.Tensor], num_cma: int) -> dict[str, torch.Tensor]:
    names = official_names(list(state), num_cma)
    return {names[k]: to_official_tensor(k, v).contiguous() for k, v in state.items()}


def convert_official(official: dict[str, torch.Tensor], our_keys: list[str], num_cma: int) -> dict[str, torch.Tensor]:
    """An official ``MMIL_Net`` state dict -> our keys and layouts, for the model whose state-dict
    keys are ``our_keys`` (load it with ``strict=False``: the backbones are not mapped). Official
    tensors with no counterpart (the unused template layers, the backbones) are left out."""
    names = official_names([k for k in our_keys if _ADAPTER.match(k) or _first(HEAD_RULES, k)], num_cma)
    out = {}
    for ours, theirs in names.items():
        if theirs in official:
            t = official[theirs]
            if ours.endswith(".bridge.token_map.weight"):
                t = t.reshape(t.shape[0], t.shape[1])
            elif re.search(r"\.bottleneck\.(down|up)\.weight$", ours):
                t = t.reshape(t.shape[0], t.shape[1], 1)
            out[ours] = t
    return out
