"""The shared trunk: frozen Swin-V2 + frozen HTS-AT run as paired blocks with adapters (spec §2.1).

Our own loop over timm's stages, not a fork of timm: per stage s, both streams go through
``stage.downsample`` (timm 1.x merges patches at the *start* of stages 1-3, which is the same
computation as timm 0.6's merge at the end of stages 0-2), then through the stage's blocks.
Visual block i of a stage is paired with audio block j when the stage has r = n_visual /
n_audio times more visual blocks and i = r (j + 1) - 1 (stage 2 of the paper model: Swin blocks
2, 5, ..., 17 with HTS-AT blocks 0..5); the other visual blocks run alone. Paired blocks are
numbered 0..11 over the network (``b{k}`` in adapter names).

One adapted paired block (X = self stream, Y = guide; every adapter reads both streams):

    rA1 = A_p1(A, V); rV1 = V_p1(V, A)                          # from the block inputs
    V = V + DropPath(LN1(WindowAttn(V))) + rV1                  # Swin-V2 res-post-norm sub-layer
    A = HTSATBlock(A) + rA1                                     # audio: after the WHOLE block
    rA2 = A_p2(A, V); rV2 = V_p2(V, A)                          # from the updated streams
    V = V + DropPath(LN2(MLP(V))) + rV2
    A = A + rA2

The Swin sub-layers are timm's own modules (``_attn``, ``norm1``, ``drop_path1``, ``mlp``,
``norm2``, ``drop_path2``) applied in the order of ``SwinTransformerV2Block.forward``, so with
zero-output adapters the result is bit-identical to the frozen backbone (tested with
``torch.equal``). Adapters act per frame (the batch axis is B*T).

Stage skipping: with ``num_skip = n > 1`` stage s is adapted iff (s + 1) % n != 0 (n = 2:
stages 0 and 2, 8 paired blocks), with n = 1 all 12; ``adapted_stages`` overrides. AV-PEA
adapts every stage (its paper's coverage) unless ``avpea_coverage="num_skip"``.

Backbone mode (spec §8.8): both encoders are frozen (``requires_grad=False``) and kept in eval
mode whatever ``model.train()`` says (no BN drift, no DropPath), unless
``backbone_train_mode=True`` reproduces the official frozen-but-training backbone. The audio
front-end's SpecAugment / mixup follow the model's training flag and their own config switches.

Audio adapters without output gate (``adapter.audio_gate=False``, the official AVS/AVQA
``is_gate=0``) add an LN-normalised residual to the HTS-AT stream from step 0, exactly like the
official code; the trunk then differs from the frozen backbone at initialisation.

Activation checkpointing (``grad_checkpointing = True``, ``AVModel.set_grad_checkpointing``):
while gradients are recorded, every block that gradients pass through is recomputed in the
backward instead of keeping its activations (``torch.utils.checkpoint``, ``use_reentrant=False``):
an adapted pair as one unit (both blocks and their four adapters), and each frozen block that
runs alone (an unpaired visual block, either block of a pair in an unadapted stage) once its
input carries a gradient; the blocks before the first adapter record nothing to begin with. The
recomputation puts back the adapters' buffers (router telemetry, BatchNorm running statistics)
as the forward left them, so gradients and every buffer equal those of a run without it (tested
bit for bit: tests/test_activation_checkpointing.py). Under ``torch.compile`` an adapted pair's
frozen sub-layers (attention, MLP, the audio block) are recomputed and its adapters keep their
activations: Dynamo accepts no ``context_fn``, and a compiled recomputation of the adapters
would update their buffers twice. Off (the default), the forward is the plain one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.models.swin_transformer import SwinTransformerBlock

from avmoe.config import AdapterConfig, AudioConfig, VisualConfig
from avmoe.models import adapters as _adapters  # noqa: F401  (registers the adapter kinds)
from avmoe.models import backbones as _backbones  # noqa: F401  (registers the backbones)
from avmoe.models.adapters.bridge import StreamSpec
from avmoe.models.buffers import buffers_restored  # (a recompute counts nothing twice)
from avmoe.models.registries import ADAPTERS, BACKBONES

POSITIONS = ("p1", "p2")
MODALITIES = ("visual", "audio")


def pair_blocks(n_visual: int, n_audio: int) -> list[int | None]:
    """For each visual block of a stage, the index of its audio partner (None: unpaired)."""
    if n_audio < 1 or n_visual % n_audio:
        raise ValueError(f"a stage with {n_visual} visual and {n_audio} audio blocks cannot be "
                         "paired (the visual depth must be a multiple of the audio depth)")
    r = n_visual // n_audio
    return [(i + 1) // r - 1 if (i + 1) % r == 0 else None for i in range(n_visual)]


def adapted_stages(cfg: AdapterConfig, num_stages: int) -> tuple[int, ...]:
    if cfg.kind == "none":
        return ()
    if cfg.adapted_stages is not None:
        return tuple(cfg.adapted_stages)
    if cfg.kind == "avpea" and cfg.avpea_coverage == "all":
        return tuple(range(num_stages))
    n = cfg.num_skip
    return tuple(s for s in range(num_stages) if n <= 1 or (s + 1) % n != 0)


@dataclass
class TrunkOutput:
    """Per-frame features, frames flattened as B*T.

    v_tokens: (BT, N_v, D_v) last-stage visual tokens after Swin's final LayerNorm.
    a_tokens: (BT, N_a, D_a) last-stage audio tokens (HTS-AT's final norm is not applied).
    v_stages / a_stages: per stage (BT, h, w, D), the stage output before the next stage's
      patch merging; the last visual entry is after the final LayerNorm (AVS multi-scale input).
    lb_loss: load-balancing loss reduced over the MoE adapters (0 without routers), unweighted.
    """

    v_tokens: torch.Tensor
    a_tokens: torch.Tensor
    v_stages: list[torch.Tensor]
    a_stages: list[torch.Tensor]
    lb_loss: torch.Tensor

    @property
    def v_feat(self) -> torch.Tensor:
        return self.v_tokens.mean(1)

    @property
    def a_feat(self) -> torch.Tensor:
        return self.a_tokens.mean(1)


_compiling = torch.compiler.is_compiling  # (a name of this module: the tests take the compiled path in eager mode)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _block_spec(block: nn.Module) -> StreamSpec:
    return StreamSpec(dim=block.norm1.normalized_shape[0], hw=tuple(block.input_resolution))


class AVTrunk(nn.Module):
    def __init__(self, visual: VisualConfig, audio: AudioConfig, adapter: AdapterConfig,
                 backbone_train_mode: bool = False):
        super().__init__()
        self.visual = BACKBONES.get("swinv2")(visual)
        self.audio = BACKBONES.get("htsat")(audio)
        for p in chain(self.visual.parameters(), self.audio.parameters()):
            p.requires_grad_(False)
        self.backbone_train_mode = backbone_train_mode
        self.lb_reduction = adapter.lb_reduction
        self.grad_checkpointing = False

        vstages, astages = self.visual.stages, self.audio.stages
        if len(vstages) != len(astages):
            raise ValueError(f"{len(vstages)} visual vs {len(astages)} audio stages")
        self.pairing = [pair_blocks(len(v.blocks), len(a.blocks)) for v, a in zip(vstages, astages)]
        adapted = set(adapted_stages(adapter, len(vstages)))
        self.adapters = nn.ModuleDict()
        self._pair_keys: list[str | None] = []  # per paired block: adapter key prefix or None
        k = 0
        for s, pairs in enumerate(self.pairing):
            for i, j in enumerate(pairs):
                if j is None:
                    continue
                key = None
                if s in adapted:
                    key = f"b{k}"
                    specs = {"visual": _block_spec(vstages[s].blocks[i]),
                             "audio": _block_spec(astages[s].blocks[j])}
                    factory = ADAPTERS.get(adapter.kind)
                    for pos in POSITIONS:
                        for mod in MODALITIES:
                            other = "audio" if mod == "visual" else "visual"
                            gate = adapter.visual_gate if mod == "visual" else adapter.audio_gate
                            self.adapters[f"{key}_{pos}_{mod}"] = factory(specs[mod], specs[other], adapter, gate)
                self._pair_keys.append(key)
                k += 1

    # ------------------------------------------------------------------ geometry

    @property
    def visual_specs(self) -> list[StreamSpec]:
        """Per stage: width and token grid of the visual stream."""
        return [_block_spec(st.blocks[0]) for st in self.visual.stages]

    @property
    def audio_specs(self) -> list[StreamSpec]:
        return [_block_spec(st.blocks[0]) for st in self.audio.stages]

    # ------------------------------------------------------------------ modes / telemetry

    def train(self, mode: bool = True) -> "AVTrunk":
        super().train(mode)
        if not self.backbone_train_mode:
            self.visual.eval()
            self.audio.eval()
        return self

    def routers(self) -> dict[str, nn.Module]:
        return {name: m.router for name, m in self.adapters.items() if hasattr(m, "router")}

    def router_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: r.stats() for name, r in self.routers().items()}

    def reset_router_stats(self) -> None:
        for r in self.routers().values():
            r.reset_stats()

    # ------------------------------------------------------------------ forward

    @staticmethod
    def _visual_attn(blk: nn.Module, v: torch.Tensor) -> torch.Tensor:
        if isinstance(blk, SwinTransformerBlock):  # pre-norm (Swin-V1 visual encoders)
            return v + blk.drop_path1(blk._attn(blk.norm1(v)))
        return v + blk.drop_path1(blk.norm1(blk._attn(v)))  # Swin-V2 res-post-norm

    @staticmethod
    def _visual_mlp(blk: nn.Module, v: torch.Tensor) -> torch.Tensor:
        if isinstance(blk, SwinTransformerBlock):
            return v + blk.drop_path2(blk.mlp(blk.norm2(v)))
        return v + blk.drop_path2(blk.norm2(blk.mlp(v)))

    def _adapted_pair(self, key: str, vblk: nn.Module, ablk: nn.Module, v: torch.Tensor, a: torch.Tensor,
                      frozen_checkpoint: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        ad = self.adapters

        def frozen(fn, *args):  # a frozen sub-layer
            return checkpoint(fn, *args, use_reentrant=False) if frozen_checkpoint else fn(*args)
        b, h, w, c = v.shape
        lbs: list[torch.Tensor] = []

        def run(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            res, lb = ad[name](_flat(x), _flat(y))
            if lb is not None:
                lbs.append(lb)
            return res.reshape(x.shape)

        r_a1 = run(f"{key}_p1_audio", a, v)
        r_v1 = run(f"{key}_p1_visual", v, a)
        v = frozen(self._visual_attn, vblk, v).reshape(b, -1, c) + _flat(r_v1)
        a = frozen(ablk, a) + r_a1
        r_a2 = run(f"{key}_p2_audio", a, v)
        r_v2 = run(f"{key}_p2_visual", v, a)
        v = (frozen(self._visual_mlp, vblk, v) + _flat(r_v2)).reshape(b, h, w, c)
        a = a + r_a2
        return v, a, lbs

    def _step(self, key: str | None, vblk: nn.Module, ablk: nn.Module, v: torch.Tensor,
              a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if key is None:
            return self._frozen(vblk, v), self._frozen(ablk, a), []
        if self.grad_checkpointing and torch.is_grad_enabled():
            if _compiling():
                # Dynamo refuses a context_fn, and a compiled recomputation would update the
                # adapters' buffers a second time: only the frozen sub-layers are recomputed
                return self._adapted_pair(key, vblk, ablk, v, a, frozen_checkpoint=True)
            adapters = [self.adapters[f"{key}_{p}_{m}"] for p in POSITIONS for m in MODALITIES]
            return checkpoint(self._adapted_pair, key, vblk, ablk, v, a, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), buffers_restored(adapters)))
        return self._adapted_pair(key, vblk, ablk, v, a)

    def _frozen(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A frozen block that runs without adapters: checkpointed when a gradient passes through it."""
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, frames: torch.Tensor, wave: torch.Tensor) -> TrunkOutput:
        """frames (BT, 3, H, W) normalised; wave (BT, samples) in [-1, 1]."""
        v = self.visual.embed(frames)
        a = self.audio.embed(wave, augment=self.training)
        lbs: list[torch.Tensor] = []
        v_stages, a_stages = [], []
        k = 0
        for s, (vstage, astage) in enumerate(zip(self.visual.stages, self.audio.stages)):
            v, a = vstage.downsample(v), astage.downsample(a)
            for i, j in enumerate(self.pairing[s]):
                if j is None:
                    v = self._frozen(vstage.blocks[i], v)
                    continue
                v, a, lb = self._step(self._pair_keys[k], vstage.blocks[i], astage.blocks[j], v, a)
                lbs.extend(lb)
                k += 1
            v_stages.append(v)
            a_stages.append(a)
        v = self.visual.final_norm(v)
        v_stages[-1] = v
        if lbs:
            lb_loss = torch.stack(lbs).sum() if self.lb_reduction == "sum" else torch.stack(lbs).mean()
        else:
            lb_loss = v.new_zeros(())
        return TrunkOutput(_flat(v), _flat(a), v_stages, a_stages, lb_loss)

    @torch.no_grad()
    def frozen_visual_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(BT, N_v, D_v) tokens of the frozen Swin, no adapters (AVQA negatives)."""
        return _flat(self.visual.forward_frozen(frames))
