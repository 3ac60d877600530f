"""CMG / Uni-Code: a discrete code space shared by audio and video, pre-trained on paired clips,
then cross-modal generalisation (../shared/spec/related-methods.md §3; the released code
haihuangcode/CMG ``code/src``). Two stages, the task's variants (``--stage``):

* ``pretrain`` (default; dataset ``vggsound-avel``): the frozen trunk's per-second features ->
  semantic encoders -> one shared codebook (nearest code, straight-through) and specific
  encoders -> reconstruction. Loss = recon_a + recon_v + commit_a + commit_v + Cross-CPC +
  0.5 L_cmcm + CLUB(code_a; specific_a) + CLUB(code_v; specific_v), each weight a config key (0
  switches a term off). Per training micro-batch, after the forward (``CMGAuxiliary``): the
  MM-EMA codebook update and the code reset, from statistics **summed over every rank** (one
  all-reduce), so every rank holds the same codebook, equal to one process on the global batch;
  then the CLUB networks' maximum-likelihood steps (``club_iters`` Adam(``club_lr``) steps on the
  detached codes and specific features, gradients averaged over ranks) and the CLUB estimate
  added to the loss. The CLUB networks, their optimiser and the reset's random generator are
  the checkpoint's client state; the codebook and its EMA / idle counters are model buffers.
  Validation: cross-modal retrieval of the clip class (nearest clip of the other modality by
  cosine of the time-mean code, same class = hit), code agreement, perplexity, live codes.
* ``downstream`` (``--protocol ave|avvp|ave_avvp --direction v2a|a2v --pretrained RUN``): the
  pre-trained encoder frozen, a small head trained on the codes of one modality and evaluated on
  both: the other modality is the zero-shot transfer (``transfer``, the primary metric), the same
  modality the labelled upper bound (``labelled``). Metrics: ``avmoe.metrics.cmg_*`` (the official
  loops, quirks included) and the plain micro alternative.

Where we differ from the released protocols (README "CMG"): model selection on the validation
split and the reported number on the test split (the code evaluates AVE on its *training* split
and picks the best epoch on the evaluated data); AVVP trains on the LLP validation split's audio
or visual segment labels (the code trains and tests on the same annotated videos), selects on
that split in the other modality and tests on the LLP test split; the frozen encoder runs in
eval mode (the code leaves its dropout on); AVE -> AVVP keeps the AVE videos of the 12 shared
classes in the loss (others weigh 0) and scores every LLP video.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from avmoe.config import ConfigError, OptimConfig, tiny_adapter, tiny_audio, tiny_visual
from avmoe.models.cmg import CLUBSample, mm_ema_stats, perplexity
from avmoe.models.heads.cmg import AVE_AVVP_SHARED, CMGConfig, CMGDownstreamHead, CMGPretrainHead
from avmoe.tasks.base import DemoRun, MetricAccumulator, Task, TaskAuxiliary, register_task
from data_pipeline.datasets import avvp as _avvp

PROTOCOL_DATASETS = {"ave": ("ave", "ave"), "avvp": ("avvp", "avvp"), "ave_avvp": ("ave", "avvp")}
# the official headline number of each protocol (the paper's columns)
PROTOCOL_METRIC = {"ave": "accuracy", "avvp": "precision", "ave_avvp": "f1"}
LLP_TO_SHARED = {i: list(AVE_AVVP_SHARED).index(c) for i, c in enumerate(_avvp.CATEGORIES) if c in AVE_AVVP_SHARED}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_ranks(tensors: list[torch.Tensor], mean: bool = False) -> None:
    """In place, every rank's sum (or mean) of ``tensors``, in one all-reduce of their
    concatenation (nothing to do on one rank)."""
    world = _world()
    if world == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    if mean:
        flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# --------------------------------------------------------------------------- labels


def segment_targets(cfg: CMGConfig, batch, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, weight): the protocol's per-segment targets of ``modality`` from the batch's
    dataset targets, (B, T, K + 1) 0/1 with background last, and a (B,) sample weight (AVE ->
    AVVP: AVE videos of a class LLP lacks weigh 0).

    AVE ``segment_labels`` are the same for both modalities; LLP's ``gt_audio`` / ``gt_visual``
    (B, C, T) are each modality's own segment annotations."""
    tg = batch.targets
    if "segment_labels" in tg:  # AVE
        seg = tg["segment_labels"].long()
        b, t = seg.shape
        if cfg.protocol == "ave_avvp":
            table = torch.tensor(list(cfg.ave_to_shared) or [-1], device=seg.device)
            k = len(AVE_AVVP_SHARED)
            fg = seg < len(cfg.ave_to_shared)
            mapped = torch.where(fg, table[seg.clamp(max=len(table) - 1)], torch.full_like(seg, -1))
            weight = ((mapped >= 0) | ~fg).all(1) & (mapped >= 0).any(1)
            col = torch.where(mapped >= 0, mapped, torch.full_like(seg, k))
        else:
            k = cfg.num_classes
            col = seg.clamp(max=k)  # background (AVE's 28) -> the last column
            weight = torch.ones(b, dtype=torch.bool, device=seg.device)
        return F.one_hot(col, k + 1).float(), weight.float()
    gt = tg["gt_audio" if modality == "audio" else "gt_visual"]  # LLP (B, C, T)
    gt = gt.float().transpose(1, 2)  # (B, T, C)
    if cfg.protocol == "ave_avvp":
        mapped = torch.zeros(*gt.shape[:2], len(AVE_AVVP_SHARED), device=gt.device)
        for src, dst in LLP_TO_SHARED.items():
            mapped[..., dst] = torch.maximum(mapped[..., dst], gt[..., src])
        gt = mapped
    bg = (gt.sum(-1, keepdim=True) == 0).float()
    return torch.cat([gt, bg], -1), torch.ones(gt.shape[0], device=gt.device)


# --------------------------------------------------------------------------- metrics


class PretrainAccumulator(MetricAccumulator):
    """Validation of the code space: ``retrieval`` (primary) = mean of audio->video and
    video->audio nearest-clip class agreement (cosine of the time-mean code vectors over the
    whole split; chance = the class frequencies), ``code_agreement`` = fraction of (clip, second)
    where both modalities take the same code, ``perplexity_*`` and ``live_codes`` of the split."""

    def __init__(self, size: int):
        self.size = size
        super().__init__()

    def reset(self):
        self.clip_a, self.clip_v, self.idx_a, self.idx_v, self.labels = [], [], [], [], []

    def update(self, preds, batch):
        for k, store in (("clip_a", self.clip_a), ("clip_v", self.clip_v), ("idx_a", self.idx_a),
                         ("idx_v", self.idx_v)):
            store.append(preds[k])
        self.labels.append(batch.targets["label"].reshape(-1).cpu())

    def compute(self):
        if not self.labels:
            return {"retrieval": float("nan")}
        a, v = torch.cat(self.clip_a).double(), torch.cat(self.clip_v).double()
        y = torch.cat(self.labels)
        a, v = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
        sim = a @ v.t()
        a2v = float((y[sim.argmax(1)] == y).double().mean())
        v2a = float((y[sim.argmax(0)] == y).double().mean())
        ia, iv = torch.cat(self.idx_a), torch.cat(self.idx_v)
        return {"retrieval": (a2v + v2a) / 2, "retrieval_a2v": a2v, "retrieval_v2a": v2a,
                "code_agreement": float((ia == iv).double().mean()),
                "perplexity_audio": perplexity(ia, self.size), "perplexity_visual": perplexity(iv, self.size),
                "live_codes": float(len(torch.unique(torch.cat([ia.flatten(), iv.flatten()]))))}


class DownstreamAccumulator(MetricAccumulator):
    """Both modalities' outputs of every clip; ``transfer`` = the protocol's official number on
    the modality the head was *not* trained on, ``labelled`` = the same on its own modality."""

    def __init__(self, cfg: CMGConfig):
        self.cfg = cfg
        super().__init__()

    def reset(self):
        self.logits = {"audio": [], "visual": []}
        self.labels = {"audio": [], "visual": []}

    def update(self, preds, batch):
        for m in ("audio", "visual"):
            self.logits[m].append(preds[f"logits_{m}"].float())
            self.labels[m].append(segment_targets(self.cfg, batch, m)[0].cpu())

    def _scores(self, m: str) -> dict[str, float]:
        from avmoe.metrics import cmg_ave_accuracy, cmg_avvp_scores, cmg_micro_scores

        logits, labels = torch.cat(self.logits[m]), torch.cat(self.labels[m])
        if not self.cfg.segment_level:
            return {"accuracy": cmg_ave_accuracy(logits, labels)}
        probs = torch.sigmoid(logits.double())
        out = cmg_avvp_scores(probs, labels)
        out.update({f"micro_{k}": v for k, v in cmg_micro_scores(probs, labels).items()})
        return out

    def _trivial(self, m: str) -> float:
        """The protocol's number for a constant guess on the test modality: the most frequent
        video class (AVE), background on every segment (AVVP, AVE -> AVVP)."""
        from avmoe.metrics import cmg_video_class, cmg_ave_accuracy, cmg_avvp_scores

        labels = torch.cat(self.labels[m])
        if not self.cfg.segment_level:
            cls = cmg_video_class(labels.numpy())
            scores = torch.zeros(len(cls), labels.shape[-1] - 1)
            scores[:, int(np.bincount(cls).argmax())] = 1
            return cmg_ave_accuracy(scores, labels)
        bg = torch.zeros_like(labels)
        bg[..., -1] = 1
        return cmg_avvp_scores(bg, labels)[PROTOCOL_METRIC[self.cfg.protocol]]

    def compute(self):
        if not self.labels["audio"]:
            return {"transfer": float("nan")}
        cfg, headline = self.cfg, PROTOCOL_METRIC[self.cfg.protocol]
        test, own = self._scores(cfg.test_modality), self._scores(cfg.train_modality)
        out = {"transfer": test[headline], "labelled": own[headline], "constant_guess": self._trivial(cfg.test_modality)}
        out.update({f"transfer_{k}": v for k, v in test.items()})
        out.update({f"labelled_{k}": v for k, v in own.items() if not k.startswith("micro")})
        return out


# --------------------------------------------------------------------------- per-batch state


class CMGAuxiliary(TaskAuxiliary):
    """Pre-training's work outside the optimiser, per training micro-batch on every rank: the
    MM-EMA codebook update and code reset (statistics all-reduced: one collective), the CLUB
    networks' own maximum-likelihood steps (gradients averaged over ranks) and the CLUB
    estimate added to the loss."""

    def __init__(self, module, cfg: CMGConfig, seed: int, device: torch.device):
        self.head, self.cfg, self.device = module.head, cfg, device
        with torch.random.fork_rng(devices=[]):  # identical CLUB networks on every rank
            torch.manual_seed(seed + 7)
            self.club_a = CLUBSample(cfg.code_dim, cfg.specific_dim, cfg.club_hidden).to(device)
            self.club_v = CLUBSample(cfg.code_dim, cfg.specific_dim, cfg.club_hidden).to(device)
        self.club_params = list(self.club_a.parameters()) + list(self.club_v.parameters())
        self.club_opt = torch.optim.Adam(self.club_params, lr=cfg.club_lr)
        self.generator = torch.Generator().manual_seed(seed + 104729)  # code resets (same on every rank)
        self.last: dict[str, float] = {}

    def _sync_codebook(self, out) -> None:
        cfg, cb = self.cfg, self.head.encoder.codebook
        mode = "code" if cfg.mm_ema == "none" else cfg.mm_ema
        stats = mm_ema_stats(cb, out["z_a"], out["z_v"], out["idx_a"], out["idx_v"], mode,
                             own_weight=1.0 if cfg.mm_ema == "none" else 0.5)
        _sum_over_ranks(list(stats.values()))  # every rank applies the global batch's update
        cb.ema_update(stats, cfg.ema_decay, cfg.ema_eps, mode)
        resets = 0
        if cfg.code_reset:
            used = (stats["count_a"] + stats["count_v"]) > 0
            resets = cb.reset_idle(used.to(cb.unused.device), cfg.reset_after, cfg.reset_pool, cfg.reset_noise, self.generator)
        m = cb.size
        self.last.update({
            "codebook_perplexity_audio": perplexity(out["idx_a"], m),
            "codebook_perplexity_visual": perplexity(out["idx_v"], m),
            "codebook_live_codes": float(((cb.unused >= 0) & (cb.unused < cfg.reset_pool)).sum()),
            "codebook_resets_total": float(cb.resets_total),
            "codebook_resets_batch": float(resets),
        })

    def _train_club(self, x_a, y_a, x_v, y_v) -> float:
        lld = 0.0
        for _ in range(self.cfg.club_iters):
            self.club_opt.zero_grad(set_to_none=False)
            loss = -(self.club_a.loglikeli(x_a, y_a) + self.club_v.loglikeli(x_v, y_v))
            loss.backward()
            _sum_over_ranks([p.grad for p in self.club_params], mean=True)  # identical nets on every rank
            self.club_opt.step()
            lld = float(loss.detach())
        return lld

    def train_batch(self, out, batch, loss, parts):
        cfg = self.cfg
        self._sync_codebook(out)
        if not cfg.club_weight:
            return loss, parts
        q_a, q_v = out["q_a"].float(), out["q_v"].float()
        s_a, s_v = out["s_a"].float(), out["s_v"].float()
        with torch.enable_grad():
            parts["club_lld"] = self._train_club(q_a.detach(), s_a.detach(), q_v.detach(), s_v.detach())
        # the estimator's own parameters take no step from the main loss (their gradients are
        # cleared before its next maximum-likelihood step)
        b = q_a.shape[0]
        mi_a = self.club_a.mi_est(q_a, s_a, torch.randperm(b, device=q_a.device))
        mi_v = self.club_v.mi_est(q_v, s_v, torch.randperm(b, device=q_v.device))
        parts["mi_a"], parts["mi_v"] = float(mi_a.detach()), float(mi_v.detach())
        return loss + cfg.club_weight * (mi_a + mi_v).to(loss.dtype), parts

    def state_dict(self):
        return {"club_a": self.club_a.state_dict(), "club_v": self.club_v.state_dict(),
                "club_opt": self.club_opt.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.club_a.load_state_dict(state["club_a"])
        self.club_v.load_state_dict(state["club_v"])
        self.club_opt.load_state_dict(state["club_opt"])
        self.generator.set_state(state["generator"])

    def gauges(self):
        return dict(self.last)


# --------------------------------------------------------------------------- the task


def _resolve_checkpoint(path: str) -> tuple[str, dict[str, Any]]:
    from avmoe.train.checkpoint import resolve

    try:
        return resolve(path)
    except FileNotFoundError as e:
        raise ConfigError(f"pretrained: {e} (expected a CMG pre-training run or checkpoint directory)") from None


# model config keys a downstream run takes from its pre-training run (the trunk and the encoder)
_DOWNSTREAM_OWN = {"stage", "protocol", "direction", "pretrained", "num_classes", "head_dim", "ave_to_shared"}


@register_task("cmg")
class CMGTask(Task):
    variants = ("pretrain", "downstream")
    variant_option = "stage"
    primary_metric = "retrieval"
    supports_ogm = False
    extra_flags = {
        "--protocol": ("protocol", "downstream protocol (--stage downstream)", False),
        "--direction": ("direction", "v2a: train on video codes, test on audio codes; a2v the reverse", False),
        "--pretrained": ("pretrained", "the pre-training run (or checkpoint) directory/URL (--stage downstream)", True),
    }
    config_class = CMGConfig
    presets = {
        "base": {"adapter": dict(kind="none")},  # the trunk stays frozen and unadapted
        # (the released CMG code reads pre-extracted VGG features; on our trunk "official" resizes
        # frames as the official AVMoE loaders do, plain bicubic)
        "official": {"visual.antialias": False},
        "tiny": {"visual": tiny_visual(), "audio": tiny_audio(), "adapter": tiny_adapter(kind="none"),
                 "code_dim": 32, "codebook_size": 64, "specific_dim": 32, "ffn": 64, "cpc_context": 32,
                 "club_hidden": 32, "head_dim": 32, "reset_after": 30, "reset_pool": 10},
    }
    # pretrain.sh: Adam 4e-4, batch 80, 6 epochs (its MultiStepLR at 10/20/30 never fires);
    # ave.sh / avvp.sh: Adam 4e-4, batch 80, 30 / 50 epochs
    training_by_stage = {
        "pretrain": OptimConfig(optimizer="adam", lr=4e-4, weight_decay=0.0, scheduler="none", epochs=6,
                                batch_size=80, grad_accum=1, seed=43),
        "downstream": OptimConfig(optimizer="adam", lr=4e-4, weight_decay=0.0, scheduler="none", epochs=30,
                                  batch_size=80, grad_accum=1, seed=43),
    }
    # the embedded demo (2 workers: global batches of 8 and 4): pre-training, then each protocol
    demo_schedule = dict(epochs=8, batch_size=4, grad_accum=1, lr=1e-3, grad_clip=0.5)
    downstream_demo_schedules = {
        "ave": dict(epochs=6, batch_size=4, grad_accum=1, lr=2e-3),
        # segment-level multi-label heads need more steps; the LLP split with segment labels
        # (val) of a 128-video synthetic set has 32 videos
        "avvp": dict(epochs=40, batch_size=2, grad_accum=1, lr=5e-3),
        "ave_avvp": dict(epochs=6, batch_size=4, grad_accum=1, lr=2e-3),
    }
    demo_llp_size = 128

    def __init__(self, variant: str | None = None) -> None:
        super().__init__(variant)
        if self.variant == "downstream":
            self.primary_metric = "transfer"

    @property
    def dataset(self) -> str:
        return "vggsound-avel" if self.variant == "pretrain" else "ave"

    def split_datasets(self, cfg):
        if self.variant == "pretrain":
            return {"train": "vggsound-avel", "eval": "vggsound-avel"}
        train, evaluate = PROTOCOL_DATASETS[cfg.protocol]
        return {"train": train, "eval": evaluate}

    def preset_layers(self, preset):
        return [self.presets["base"], {"stage": self.variant}, self.presets.get(preset, {})]

    def training_defaults(self, preset):
        return copy.deepcopy(self.training_by_stage[self.variant])

    def model_keys(self, manifest):
        keys = super().model_keys(manifest)
        classes = (manifest.get("label_vocab") or {}).get("classes")
        if classes is not None:
            keys["num_classes"] = len(classes)
            if manifest.get("dataset") == "ave" and self.variant == "downstream":
                shared = {a: i for i, names in enumerate(AVE_AVVP_SHARED.values()) for a in names}
                keys["ave_to_shared"] = tuple(shared.get(c, -1) for c in classes)
        return keys

    def complete_config(self, tcfg):
        """Downstream: the trunk and encoder settings of the pre-training run (its preset and
        model keys), its checkpoint path; the LLP split with segment labels to train on."""
        if self.variant != "downstream" or tcfg.evaluation.eval_only:
            return
        cfg = tcfg.task_config()
        if not cfg.pretrained:
            raise ConfigError("pretrained: --stage downstream needs the pre-training run: --pretrained RUN_DIR "
                              "(a local path or URL of a `--stage pretrain` run, or one of its checkpoints)")
        ckpt, meta = _resolve_checkpoint(cfg.pretrained)
        saved = meta.get("meta", {}).get("config") or {}
        if saved.get("task") != "cmg" or (saved.get("variant") or "pretrain") != "pretrain":
            raise ConfigError(f"pretrained: {ckpt} is a {meta.get('meta', {}).get('task')!r} checkpoint, not a "
                              f"CMG pre-training one")
        if int(meta["meta"].get("zero_stage") or 0) > 2:
            raise ConfigError(f"pretrained: {ckpt} was written with ZeRO-3 (partitioned weights); pre-train with "
                              "--zero-stage 0-2 to reuse the encoder downstream (not yet: ZeRO-3 consolidation)")
        tcfg.preset = saved.get("preset", tcfg.preset)
        for key, value in (saved.get("model") or {}).items():
            if key.split(".")[0] not in _DOWNSTREAM_OWN:
                tcfg.model[key] = value
        tcfg.model["pretrained"] = ckpt
        if cfg.protocol == "avvp" and tcfg.paths.train_split == "train":
            tcfg.paths.train_split = "val"  # the LLP split with segment labels (the code trains on eval videos)
        if cfg.protocol == "ave_avvp" and not tcfg.paths.eval_data:
            raise ConfigError("eval_data: --protocol ave_avvp trains on AVE shards (--data) and evaluates on LLP "
                              "shards: pass --eval-data URL_OF_AVVP_SHARDS")

    def build_model(self, cfg: CMGConfig):
        from avmoe.models.model import AVModel

        head_cls = CMGPretrainHead if cfg.stage == "pretrain" else CMGDownstreamHead
        outer = torch.get_rng_state()

        def head(c, trunk):  # the head from the run's own seed, the trunk from trunk_seed
            torch.set_rng_state(outer)
            return head_cls(c, trunk)

        torch.manual_seed(cfg.trunk_seed)
        model = AVModel(cfg, head=head)
        if cfg.stage == "downstream" and cfg.pretrained:
            load_pretrained_encoder(model, cfg.pretrained)
        return model

    # ------------------------------------------------------------------ training
    def auxiliary(self, module, cfg, seed, device):
        return CMGAuxiliary(module, cfg, seed, device) if cfg.stage == "pretrain" else None

    def loss(self, out, batch, cfg):
        if cfg.stage == "pretrain":
            parts = {k: out[k] for k in ("recon_a", "recon_v", "commit_a", "commit_v", "cpc", "cmcm")}
            total = (cfg.recon_weight * (parts["recon_a"] + parts["recon_v"])
                     + cfg.commit_weight * (parts["commit_a"] + parts["commit_v"])
                     + cfg.cpc_weight * parts["cpc"] + cfg.cmcm_weight * parts["cmcm"])
            floats = self._floats(parts)
            floats.update({k: float(v) for k, v in out.items() if k.startswith("cpc_acc_")})
            return total, floats
        modality = cfg.train_modality
        logits = out[f"logits_{modality}"]
        labels, weight = segment_targets(cfg, batch, modality)
        labels, weight = labels.to(logits.device), weight.to(logits.device)
        if not cfg.segment_level:  # AVE: the video's class from its segment labels
            from avmoe.metrics import cmg_video_class  # (one rule for the loss and the metric)

            y = torch.as_tensor(cmg_video_class(labels.cpu().numpy()), device=logits.device)
            ce = F.cross_entropy(logits.float(), y)
            return ce, {"ce": float(ce.detach())}
        flat, y = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1, labels.shape[-1])
        w = weight[:, None].expand(labels.shape[:2]).reshape(-1)
        bce = (F.binary_cross_entropy_with_logits(flat, y, reduction="none").mean(1) * w).sum() / w.sum().clamp(min=1)
        # the code's ExpLogLoss: -sum_c y_c log_softmax(x)_c exp(-alpha_c), mean over segments
        alpha = out["alpha"].float()
        exp_log = (-(y * F.log_softmax(flat, -1) * torch.exp(-alpha)).sum(1) * w).sum() / w.sum().clamp(min=1)
        return bce + exp_log, {"bce": float(bce.detach()), "exp_log": float(exp_log.detach())}

    def predict(self, out, batch):
        if "logits_audio" in out:
            return {k: out[k].detach().float().cpu() for k in ("logits_audio", "logits_visual")} | {
                "idx_a": out["idx_a"].cpu(), "idx_v": out["idx_v"].cpu()}
        return {"clip_a": out["q_a"].detach().float().mean(1).cpu(), "clip_v": out["q_v"].detach().float().mean(1).cpu(),
                "idx_a": out["idx_a"].cpu(), "idx_v": out["idx_v"].cpu()}

    def metric_accumulator(self, cfg):
        return PretrainAccumulator(cfg.codebook_size) if cfg.stage == "pretrain" else DownstreamAccumulator(cfg)

    def example_targets(self, cfg, batch_size, generator):
        b, t = batch_size, cfg.num_segments
        if cfg.stage == "pretrain":
            return {"label": torch.randint(0, cfg.num_classes, (b,), generator=generator)}
        if cfg.protocol == "avvp":
            c = cfg.num_classes
            return {"gt_audio": torch.randint(0, 2, (b, c, t), generator=generator).to(torch.uint8),
                    "gt_visual": torch.randint(0, 2, (b, c, t), generator=generator).to(torch.uint8)}
        labels = torch.randint(0, cfg.num_classes, (b, 1), generator=generator).expand(b, t).clone()
        labels[:, 0] = cfg.num_classes  # one background segment per video
        return {"segment_labels": labels}

    def plot_predictions(self, items, out_dir, title):
        if not items or "idx_a" not in items[0][1]:
            return []
        from avmoe.plots import plot_code_usage

        ia = torch.cat([p["idx_a"].reshape(-1) for _, p, _ in items])
        iv = torch.cat([p["idx_v"].reshape(-1) for _, p, _ in items])
        return [plot_code_usage(ia.numpy(), iv.numpy(), out_dir, title)]

    # ------------------------------------------------------------------ the embedded demo
    def demo_plan(self):
        runs = [DemoRun("pretrain", "pretrain", "vggsound-avel", dict(self.demo_schedule))]
        for protocol in ("ave", "avvp", "ave_avvp"):
            train, evaluate = PROTOCOL_DATASETS[protocol]
            for direction in ("v2a", "a2v"):
                runs.append(DemoRun(f"{protocol}-{direction}", "downstream", train,
                                    {**self.downstream_demo_schedules[protocol], "model.protocol": protocol,
                                     "model.direction": direction, "model.pretrained": "{run:pretrain}"},
                                    eval_dataset=evaluate if evaluate != train else None,
                                    size=self.demo_llp_size if "avvp" in protocol else None))
        return runs

    def demo_summary(self, runs):
        lines = ["", "CMG cross-modal generalisation (test split, synthetic demo data):",
                 f"  {'protocol':10s} {'metric':9s} {'V->A':>7s} {'A->V':>7s} {'V->V':>7s} {'A->A':>7s} "
                 f"{'constant guess (V->A, A->V)':>28s}"]
        pre = [r for run, r in runs if run.variant == "pretrain"]
        table: dict[str, dict[str, float]] = {}
        for run, r in runs:
            if run.variant != "downstream":
                continue
            mc, test = r.get("model_config", {}), r.get("test") or {}
            row = table.setdefault(mc.get("protocol", "?"), {})
            row[mc.get("direction")] = test.get("transfer", float("nan"))
            row["own_" + mc.get("direction", "")] = test.get("labelled", float("nan"))
            row["guess_" + mc.get("direction", "")] = test.get("constant_guess", float("nan"))
        for protocol, row in table.items():
            lines.append(f"  {protocol:10s} {PROTOCOL_METRIC[protocol]:9s} {row.get('v2a', float('nan')):7.4f} "
                         f"{row.get('a2v', float('nan')):7.4f} {row.get('own_v2a', float('nan')):7.4f} "
                         f"{row.get('own_a2v', float('nan')):7.4f} {row.get('guess_v2a', float('nan')):13.4f}, "
                         f"{row.get('guess_a2v', float('nan')):.4f}")
        if pre:
            t = pre[0].get("test") or {}
            lines.append(f"  pre-training: retrieval {t.get('retrieval', float('nan')):.4f}, code agreement "
                         f"{t.get('code_agreement', float('nan')):.4f}, live codes {t.get('live_codes', float('nan')):.0f}")
        lines.append("  (V->A: head trained on video codes, tested on audio codes; V->V / A->A: the labelled "
                     "modality's upper bound)")
        return "\n".join(lines)


def load_pretrained_encoder(model, ckpt: str) -> None:
    """The pre-trained encoder (semantic + specific encoders, codebook and its statistics) from a
    ZeRO 0-2 pre-training checkpoint into ``model.head.encoder``; the trunk must be the one it was
    trained on (its fingerprint is checked)."""
    import os
    import tempfile

    from avmoe.train.checkpoint import TAG
    from avmoe.train.engine import safe_load
    from data_pipeline import storage

    rel = f"ds/{TAG}/mp_rank_00_model_states.pt"
    if storage.is_local(ckpt):
        sd = safe_load(os.path.join(storage.local_path(ckpt), rel), map_location="cpu")["module"]
    else:
        fs, base = storage.filesystem(ckpt)
        with tempfile.TemporaryDirectory(prefix="avmoe-cmg-") as d:
            fs.get_file(storage.join(base, rel), os.path.join(d, "m.pt"))
            sd = safe_load(os.path.join(d, "m.pt"), map_location="cpu")["module"]
    enc = {k[len("head.encoder."):]: v for k, v in sd.items() if k.startswith("head.encoder.")}
    if not enc:
        raise ValueError(f"{ckpt}: no CMG encoder weights (head.encoder.*) in its model states")
    fp = sd.get("head.trunk_fingerprint")
    mine = model.head.trunk_fingerprint
    if fp is not None and not torch.allclose(fp.double(), mine.double(), rtol=1e-9, atol=1e-6):
        raise ValueError(f"{ckpt}: its encoder was pre-trained on another trunk (fingerprint {float(fp):.6g}, this "
                         f"model's {float(mine):.6g}): use the pre-training run's preset, trunk settings and trunk_seed")
    model.head.encoder.load_state_dict(enc, strict=True)
