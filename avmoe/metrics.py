"""Evaluation metrics of AVE, AVVP (LLP), AVSBench (S4/MS3), MUSIC-AVQA and CMG's cross-modal
protocols, quirks included.

Each function reproduces the number printed by the benchmark's official evaluation code
(../shared/spec/metrics.md), as a fraction in [0, 1] instead of x100. Inputs may be numpy
arrays or torch tensors (any device); results are Python floats.

Dtype rule: thresholds and sigmoids are applied to predictions in the dtype they arrive in,
as the official torch/numpy code would do on the same tensor (the official models emit
float32); the arithmetic the official code does in float32 (AVSBench) is done in float32 here.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from data_pipeline.datasets import avqa as _avqa, avvp as _avvp

__all__ = [
    "AVQA_QUESTION_TYPES",
    "AVVP_CATEGORIES",
    "ave_accuracy",
    "ave_labels_from_event_scores",
    "avqa_accuracy",
    "avs_fscore",
    "avs_miou",
    "avvp_binarize",
    "avvp_gt_matrix",
    "avvp_scores",
    "cmg_ave_accuracy",
    "cmg_avvp_scores",
    "cmg_micro_scores",
    "cmg_video_class",
]

# Class order of the GT matrix rows (AVVP-ECCV20 main_avvp.py `eval`) and the MUSIC-AVQA
# (type, subtype) groups of main_avst.py `test` (an int question type indexes this list).
AVVP_CATEGORIES: list[str] = list(_avvp.CATEGORIES)
AVQA_QUESTION_TYPES: list[tuple[str, str]] = list(_avqa.QUESTION_TYPES)

AVS_NUM_THRESHOLDS = 255
_AVS_BETA2 = 0.3


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def _require_binary(name: str, x: np.ndarray) -> np.ndarray:
    """x as uint8 if every value is 0 or 1, else ValueError (NaN included)."""
    if x.dtype != np.bool_ and not np.all((x == 0) | (x == 1)):
        raise ValueError(f"{name} must be binary (0/1); threshold it first")
    return x.astype(np.uint8)


def _check_positive(name: str, k: int | None) -> None:
    if k is not None and (int(k) != k or k < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {k!r}")


def _batch_slices(n: int, per_batch: int | None) -> list[slice]:
    """Consecutive loader batches over n items (None: a single batch of everything)."""
    step = n if per_batch is None else int(per_batch)
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


# --------------------------------------------------------------------------- AVE


def _ave_labels(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim == 3:
        a = a.argmax(-1)  # first index on ties, like torch.max
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N, T) labels or (N, T, C) scores, got {a.shape}")
    return a


def ave_accuracy(pred_labels: Any, gt_labels: Any, batch_size: int | None = None) -> float:
    """AVE segment accuracy (AVE-ECCV18 `compute_acc`, LAVisH total_acc / total_num).

    Micro accuracy over all N*T segments. With ``batch_size=k`` it is DG-SCT's `eval()`:
    the mean of per-batch accuracies over consecutive batches of k videos, so a partial
    last batch weighs as much as a full one. (DG-SCT keeps that mean as a float32 running
    mean in percent; this is the exact mean, which differs only by that rounding.)
    """
    pred = _ave_labels(pred_labels, "pred_labels")
    gt = _ave_labels(gt_labels, "gt_labels")
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    _check_positive("batch_size", batch_size)
    correct = pred == gt
    if correct.size == 0:
        return math.nan
    if batch_size is None:
        return float(correct.mean())
    return float(np.mean([correct[s].mean() for s in _batch_slices(len(correct), batch_size)]))


def ave_labels_from_event_scores(
    is_event_logits: Any, class_scores: Any, background: int = 28
) -> np.ndarray:
    """Decode the two-head AVE output (CMBS / LAVisH / DG-SCT `compute_accuracy_supervised`).

    ``is_event_logits`` (N, T) (or (N, T, 1)); ``class_scores`` (N, C) video-level scores.
    A segment is foreground iff sigmoid(logit) > 0.5 strictly (computed in the logits'
    dtype, so a logit of exactly 0 is background); every foreground segment of a video takes
    the argmax of that video's scores. Returns (N, T) int64 labels, ``background`` elsewhere.
    """
    logits = _to_tensor(is_event_logits)
    if logits.ndim == 3 and logits.shape[-1] == 1:
        logits = logits.squeeze(-1)
    if not logits.is_floating_point():
        logits = logits.to(torch.float32)
    scores = _to_numpy(class_scores)
    if logits.ndim != 2 or scores.ndim != 2 or scores.shape[0] != logits.shape[0]:
        raise ValueError(
            "expected (N, T) logits and (N, C) scores, "
            f"got {tuple(logits.shape)} and {scores.shape}"
        )
    foreground = (torch.sigmoid(logits) > 0.5).numpy()
    event_class = scores.argmax(-1).astype(np.int64)
    return np.where(foreground, event_class[:, None], np.int64(background))


# --------------------------------------------------------------------------- AVVP

_Counts = tuple[np.ndarray, np.ndarray, np.ndarray]  # TP, FP, FN, each (N, C)


def _avvp_nct(x: Any, name: str, layout: str) -> np.ndarray:
    a = _require_binary(name, _to_numpy(x))
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (N, C, T), (N, T, C) or one 2-D video, got {a.shape}")
    return a if layout == "NCT" else a.transpose(0, 2, 1)


def _check_layout(layout: str) -> None:
    if layout not in ("NCT", "NTC"):
        raise ValueError(f"layout must be 'NCT' or 'NTC', got {layout!r}")


def _segment_counts(pred: np.ndarray, gt: np.ndarray) -> _Counts:
    """Per video and class, TP/FP/FN over segments (eval_metrics.segment_level)."""
    p, g = pred.astype(np.int64), gt.astype(np.int64)
    return (p * g).sum(-1), (p * (1 - g)).sum(-1), ((1 - p) * g).sum(-1)


def _runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of 1s in each row of x (R, T).

    Returns the run id of every position (-1 where off), and each run's row and length.
    """
    on = x.astype(bool)
    start = on.copy()
    start[:, 1:] &= ~on[:, :-1]
    ids = np.where(on, np.cumsum(start.ravel()).reshape(on.shape) - 1, -1)
    rows = np.nonzero(start)[0]
    lengths = np.bincount(ids[on], minlength=len(rows))
    return ids, rows, lengths


def _event_counts(pred: np.ndarray, gt: np.ndarray, iou_threshold: float) -> _Counts:
    """Per video and class, event TP/FP/FN (eval_metrics.event_level / event_wise_metric).

    A predicted run is a TP if |inter| >= thr * |union| with any GT run of its class (an FP
    otherwise); a GT run matched by no predicted run is an FN. No one-to-one assignment.
    """
    n, c, t = pred.shape
    pid, prow, plen = _runs(pred.reshape(n * c, t))
    gid, grow, glen = _runs(gt.reshape(n * c, t))
    both = (pid >= 0) & (gid >= 0)
    # Only overlapping pairs can match (threshold > 0), so the pair set is sparse.
    pair, inter = np.unique(pid[both] * len(glen) + gid[both], return_counts=True)
    pi, gi = np.divmod(pair, max(len(glen), 1))
    match = inter >= iou_threshold * (plen[pi] + glen[gi] - inter)
    p_hit = np.zeros(len(plen), bool)
    p_hit[pi[match]] = True
    g_hit = np.zeros(len(glen), bool)
    g_hit[gi[match]] = True

    def per_row(rows: np.ndarray) -> np.ndarray:
        return np.bincount(rows, minlength=n * c).reshape(n, c)

    return per_row(prow[p_hit]), per_row(prow[~p_hit]), per_row(grow[~g_hit])


def _video_f1(counts: _Counts) -> np.ndarray:
    """Per video: mean over active classes of 2TP/(2TP+FP+FN); 1.0 with no active class."""
    tp, fp, fn = (x.astype(np.float64) for x in counts)
    active = (tp + fp > 0) | (tp + fn > 0)
    f1 = np.where(active, 2 * tp / np.where(active, 2 * tp + fp + fn, 1.0), 0.0)
    n_active = active.sum(-1)
    return np.where(n_active > 0, f1.sum(-1) / np.maximum(n_active, 1), 1.0)


def _avvp_level(
    counter: Callable[[np.ndarray, np.ndarray], _Counts],
    tracks: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """a / v / av means over videos, Type@AV (mean of the three) and Event@AV (a+v pooled)."""
    counts = {k: counter(p, g) for k, (p, g) in tracks.items()}
    pooled = tuple(ca + cv for ca, cv in zip(counts["a"], counts["v"]))

    def mean(c: _Counts) -> float:
        f = _video_f1(c)
        return float(f.mean()) if f.size else math.nan

    out = {k: mean(c) for k, c in counts.items()}
    out["type"] = (out["a"] + out["v"] + out["av"]) / 3.0
    out["event"] = mean(pooled)
    return out


def avvp_scores(
    pred_a: Any,
    pred_v: Any,
    gt_a: Any,
    gt_v: Any,
    layout: str = "NCT",
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """AVVP segment- and event-level F1 (AVVP-ECCV20 main_avvp.py `eval`).

    Binary (N, C, T) inputs (``layout="NTC"`` for (N, T, C); a 2-D array is one video).
    The AV track is the product of the a and v tracks. Each number is the unweighted mean
    over videos of the per-video mean F1 over active classes, where a video with no active
    class scores 1.0. Event-level matching is IoU >= ``iou_threshold`` (inclusive).
    Returns ``seg_{a,v,av,type,event}`` and ``evt_{a,v,av,type,event}``.
    """
    _check_layout(layout)
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pa, pv, ga, gv = (
        _avvp_nct(x, name, layout)
        for x, name in ((pred_a, "pred_a"), (pred_v, "pred_v"), (gt_a, "gt_a"), (gt_v, "gt_v"))
    )
    if not pa.shape == pv.shape == ga.shape == gv.shape:
        raise ValueError(f"shape mismatch: {pa.shape}, {pv.shape}, {ga.shape}, {gv.shape}")
    tracks = {"a": (pa, ga), "v": (pv, gv), "av": (pa * pv, ga * gv)}
    seg = _avvp_level(_segment_counts, tracks)
    evt = _avvp_level(lambda p, g: _event_counts(p, g, iou_threshold), tracks)
    return {**{f"seg_{k}": v for k, v in seg.items()}, **{f"evt_{k}": v for k, v in evt.items()}}


def avvp_binarize(
    frame_probs: Any, video_probs: Any, threshold: float = 0.5, layout: str = "NCT"
) -> np.ndarray:
    """AVVP segment predictions (main_avvp.py `eval`): frame prob >= thr AND video prob >= thr.

    ``frame_probs`` (N, C, T) (or (N, T, C) with ``layout="NTC"``, or one 2-D video) and
    ``video_probs`` (N, C) (or (C,)). Both comparisons are non-strict. Returns uint8 in the
    layout of ``frame_probs``.
    """
    _check_layout(layout)
    frame, video = _to_numpy(frame_probs), _to_numpy(video_probs)
    single = frame.ndim == 2
    if single:
        frame, video = frame[None], video.reshape(1, -1)
    time_axis = 2 if layout == "NCT" else 1
    class_axis = 3 - time_axis
    if frame.ndim != 3 or video.shape != (frame.shape[0], frame.shape[class_axis]):
        raise ValueError(f"frame_probs {frame.shape} and video_probs {video.shape} do not match")
    out = ((frame >= threshold) & np.expand_dims(video >= threshold, time_axis)).astype(np.uint8)
    return out[0] if single else out


def avvp_gt_matrix(
    events: Iterable[tuple[int | str, Any, Any]], num_classes: int = 25, num_segments: int = 10
) -> np.ndarray:
    """AVVP ground-truth matrix (main_avvp.py `eval`): ``GT[c, int(onset):int(offset)] = 1``.

    ``events`` are (class, onset, offset) rows of AVVP_eval_audio.csv / _visual.csv for one
    video; class is an index or an AVVP_CATEGORIES name; offset is exclusive. Returns
    (num_classes, num_segments) uint8.
    """
    gt = np.zeros((num_classes, num_segments), np.uint8)
    for cls, onset, offset in events:
        c = AVVP_CATEGORIES.index(cls) if isinstance(cls, str) else int(cls)
        start, stop = int(onset), int(offset)
        if not 0 <= c < num_classes or start < 0 or stop < 0:
            raise ValueError(f"bad event {(cls, onset, offset)!r}")
        gt[c, start:stop] = 1
    return gt


# --------------------------------------------------------------------------- AVSBench


def _avs_inputs(pred: Any, gt_masks: Any, from_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, T, H, W) probabilities and float32 binary masks; (N, H, W) becomes N one-frame videos."""
    p = _to_tensor(pred)
    g = torch.from_numpy(_require_binary("gt_masks", _to_numpy(gt_masks)))
    if p.shape != g.shape or p.ndim not in (3, 4):
        raise ValueError(
            "pred and gt_masks must share a (V, T, H, W) or (N, H, W) shape, "
            f"got {tuple(p.shape)} and {tuple(g.shape)}"
        )
    if p.ndim == 3:
        p, g = p[:, None], g[:, None]
    if from_logits:
        p = torch.sigmoid(p)
    return p, g.to(torch.float32)


def avs_miou(
    pred: Any, gt_masks: Any, videos_per_batch: int | None = 4, from_logits: bool = False
) -> float:
    """AVSBench M_J (avs_s4/utils/utility.py `mask_iou` + test.py AverageMeter).

    Foreground iff prob > 0.5 (strict). Per frame IoU = inter / (union + 1e-7) in float32;
    a frame with empty GT scores (# predicted-background pixels) / (H*W). Mean over the
    frames of each batch of ``videos_per_batch`` videos, then the unweighted mean over
    batches, both in float32 as the official code does (None: one batch, a frame mean).
    (N, H, W) input is N one-frame videos, so ``videos_per_batch`` counts frames.
    """
    _check_positive("videos_per_batch", videos_per_batch)
    p, g = _avs_inputs(pred, gt_masks, from_logits)
    if p.shape[0] * p.shape[1] == 0:
        return math.nan
    fg = (p > 0.5).flatten(2)
    gt = g.flatten(2) > 0
    empty = ~gt.any(-1)
    # Empty GT: inter = #(pred bg & gt bg) = #pred bg, union = H*W.
    inter = torch.where(empty, (~fg).sum(-1), (fg & gt).sum(-1)).to(torch.float32)
    union = torch.where(empty, fg.shape[-1], (fg | gt).sum(-1)).to(torch.float32)
    iou = inter / (union + 1e-7)
    total = torch.zeros((), dtype=torch.float32)
    batches = _batch_slices(len(iou), videos_per_batch)
    for s in batches:
        frames = iou[s].reshape(-1)
        total = total + torch.sum(frames) / len(frames)
    return float(total / len(batches))


def _avs_pr_counts(
    prob: torch.Tensor, gt: torch.Tensor, thresholds: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame and threshold, #(prob >= th) and #(prob >= th and gt): (F, K) int64 each.

    Compared in the dtype torch would use for ``prob >= thresholds[i]``; exact counts, so
    the official per-threshold loop is replaced by one histogram per frame.
    """
    dtype = torch.result_type(prob, thresholds[0])
    th = thresholds.to(dtype).to(torch.float64)
    bins = len(th) + 1
    n_pred, tp = [], []
    for start in range(0, len(prob), chunk):
        x = prob[start : start + chunk].to(dtype).to(torch.float64).flatten(1)
        x = torch.nan_to_num(x, nan=-math.inf)  # NaN >= th is False
        # k = #(th <= x), so x >= th[i] iff i < k (thresholds ascending).
        k = torch.searchsorted(th, x, right=True) + torch.arange(len(x))[:, None] * bins
        for out, ids in ((n_pred, k.flatten()), (tp, k[gt[start : start + chunk].flatten(1) > 0])):
            hist = torch.bincount(ids, minlength=len(x) * bins).reshape(len(x), bins)
            out.append(hist.sum(-1, keepdim=True) - hist.cumsum(-1)[:, :-1])
    return torch.cat(n_pred), torch.cat(tp)


def avs_fscore(
    pred: Any, gt_masks: Any, videos_per_batch: int | None = 4, from_logits: bool = False
) -> float:
    """AVSBench M_F (avs_s4/utils/utility.py `Eval_Fmeasure` / `_eval_pr` + test.py).

    Per frame, at the 255 float32 thresholds ``linspace(0, 1 - 1e-10)`` (the last is exactly
    1.0; fg iff prob >= th): P = tp/(npred+1e-20), R = tp/(ngt+1e-20),
    F = 1.3PR/(0.3P+R), NaN -> 0, all in float32. Within each batch of ``videos_per_batch``
    videos, frames with empty GT are skipped, the F curves are averaged and the batch scores
    the max of the mean curve (0.0 if every frame is empty, and it still counts). Result:
    mean over batches in float64 (None: one batch of everything). (N, H, W) input is N
    one-frame videos, so ``videos_per_batch`` counts frames.
    """
    _check_positive("videos_per_batch", videos_per_batch)
    p, g = _avs_inputs(pred, gt_masks, from_logits)
    if p.shape[0] * p.shape[1] == 0:
        return math.nan
    thresholds = torch.linspace(0, 1 - 1e-10, AVS_NUM_THRESHOLDS, dtype=torch.float32)
    n_gt = g.flatten(2).sum(-1)  # float32, exact integer counts

    scores = []
    for s in _batch_slices(len(g), videos_per_batch):
        keep = n_gt[s] != 0
        if not bool(keep.any()):
            scores.append(0.0)
            continue
        n_pred, tp = _avs_pr_counts(p[s][keep], g[s][keep], thresholds)
        tp = tp.to(torch.float32)
        prec = tp / (n_pred.to(torch.float32) + 1e-20)
        recall = tp / (n_gt[s][keep][:, None] + 1e-20)
        f = (1 + _AVS_BETA2) * prec * recall / (_AVS_BETA2 * prec + recall)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
        # The official code sums frame curves one by one in float32; keep that order.
        curve = f[0]
        for row in f[1:]:
            curve = curve + row
        scores.append((curve / len(f)).max().item())
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- MUSIC-AVQA


def _avqa_keys() -> list[str]:
    """Result keys: each type's subtypes then the type itself, in table order; "Overall" last."""
    keys: list[str] = []
    for i, (t, s) in enumerate(AVQA_QUESTION_TYPES):
        keys.append(f"{t}/{s}")
        if i + 1 == len(AVQA_QUESTION_TYPES) or AVQA_QUESTION_TYPES[i + 1][0] != t:
            keys.append(t)
    return keys + ["Overall"]


_AVQA_KEYS = _avqa_keys()


def _question_type(q: Any) -> tuple[str, str]:
    if isinstance(q, bytes):
        q = q.decode()
    if isinstance(q, str):
        try:
            q = json.loads(q)
        except ValueError:
            q = ast.literal_eval(q)  # main_avst.py parses the json field this way
    pair = tuple(str(x) for x in q)
    if len(pair) != 2:
        raise ValueError(f"question type must be a (type, subtype) pair, got {q!r}")
    return pair[0], pair[1]


def _question_types(question_types: Any, n: int) -> list[tuple[str, str]]:
    items = question_types
    if isinstance(items, (torch.Tensor, np.ndarray)):
        arr = _to_numpy(items)
        if np.issubdtype(arr.dtype, np.integer) and arr.ndim != 1:
            raise ValueError(f"integer question_types must be (N,) indices, got shape {arr.shape}")
        items = arr.tolist() if np.issubdtype(arr.dtype, np.integer) else list(arr)
    items = list(items)
    if all(isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in items):
        if any(not 0 <= q < len(AVQA_QUESTION_TYPES) for q in items):
            raise ValueError("integer question_types must index AVQA_QUESTION_TYPES")
        types = [AVQA_QUESTION_TYPES[q] for q in items]
    else:
        types = [_question_type(q) for q in items]
    if len(types) != n:
        raise ValueError(f"{len(types)} question types for {n} questions")
    return types


def _answers(x: Any) -> list[Any]:
    a = _to_numpy(x)
    if a.ndim == 2 and np.issubdtype(a.dtype, np.number):
        a = a.argmax(1)  # answer scores -> ids, first index on ties like torch.max
    if a.ndim != 1:
        raise ValueError(f"expected (N,) answers or (N, A) scores, got {a.shape}")
    return a.tolist()


def avqa_accuracy(preds: Any, answers: Any, question_types: Any) -> dict[str, float]:
    """MUSIC-AVQA accuracies (net_grd_avst/main_avst.py `test`).

    ``preds`` and ``answers`` are answer ids or strings (``preds`` may be (N, A) scores);
    ``question_types`` per question a (type, subtype) pair, the raw json string such as
    '["Audio", "Counting"]', or an (N,) int array of indices into AVQA_QUESTION_TYPES.
    Every entry, each type ("Audio") and "Overall" included, is a micro accuracy over its
    questions (not a mean of group accuracies); an empty group is NaN. As in the official
    code, a question whose pair is not in AVQA_QUESTION_TYPES counts in "Overall" only.
    """
    pred, gold = _answers(preds), _answers(answers)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} answers")
    types = _question_types(question_types, len(gold))
    known = set(AVQA_QUESTION_TYPES)
    correct = dict.fromkeys(_AVQA_KEYS, 0)
    total = dict.fromkeys(_AVQA_KEYS, 0)
    for p, a, (t, s) in zip(pred, gold, types):
        keys = (f"{t}/{s}", t, "Overall") if (t, s) in known else ("Overall",)
        for key in keys:
            correct[key] += int(p == a)
            total[key] += 1
    return {k: correct[k] / total[k] if total[k] else math.nan for k in _AVQA_KEYS}


# --------------------------------------------------------------------------- CMG (cross-modal generalisation)


def cmg_video_class(labels: np.ndarray) -> np.ndarray:
    """(N, T, C+1) one-hot segment labels, background last -> (N,) the video's class: per
    segment the argmax of the C event columns (a background segment, all zero there, gives 0),
    then the largest over time (CMG ave.py; one event class per AVE video)."""
    if labels.ndim != 3 or labels.shape[-1] < 2:
        raise ValueError(f"labels must be (N, T, C+1) one-hot with background last, got {labels.shape}")
    return labels[:, :, :-1].argmax(-1).max(-1)


def cmg_ave_accuracy(scores: Any, labels: Any, batch_size: int | None = 80) -> float:
    """CMG's AVE cross-modal accuracy (haihuangcode/CMG code/src/ave.py ``validate_epoch``):
    video-level classification, ``scores`` (N, C) (argmax, first index on ties), ``labels``
    (N, T, C+1) one-hot segment labels with background last; the video's class is
    ``cmg_video_class``. Per loader batch of ``batch_size`` videos (None: one batch) the
    official loop computes ``acc_b = correct_b * (100 / B_b)`` in float64 and averages it with
    weight ``10 * B_b``: the exact fraction of correct videos up to that rounding, reproduced
    here. A fraction (the official log prints x100)."""
    s, y = _to_numpy(scores), _to_numpy(labels)
    if s.ndim != 2 or len(s) != len(y):
        raise ValueError(f"scores must be (N, C) for the N={len(y)} videos of labels, got {s.shape}")
    _check_positive("batch_size", batch_size)
    correct = s.argmax(-1) == cmg_video_class(y)
    if correct.size == 0:
        return math.nan
    total, count = 0.0, 0
    t = y.shape[1]
    for sl in _batch_slices(len(correct), batch_size):
        b = len(correct[sl])
        acc_b = float(np.float64(correct[sl].sum()) * (100.0 / b))
        total += acc_b * (b * t)
        count += b * t
    return total / count / 100.0


def cmg_avvp_scores(probs: Any, labels: Any, batch_size: int | None = 80,
                    threshold: float = 0.5) -> dict[str, float]:
    """CMG's AVVP cross-modal scores (code/src/avvp.py ``compute_accuracy_supervised_sigmoid``
    and ``validate_epoch``; also ave_avvp.py): ``probs`` (N, T, C) per-segment probabilities,
    ``labels`` (N, T, C) binary, both with the background column included.

    Per loader batch of ``batch_size`` videos (None: one batch): ``pred = probs > threshold``
    (strict); P_b = TP / #predicted and R_b = TP / #positive over every (segment, class) cell of
    the batch, in float32 as the code computes them; a batch with no positive prediction counts
    P_b = R_b = 0 (and still counts). P and R are averaged over batches with weight
    ``T * B_b``; F1 = 2PR / (P + R) from the averaged P and R (0 when both are 0, where the
    code would divide by zero). The paper's AVVP "accuracy" is this precision."""
    p, y = _to_numpy(probs), _to_numpy(labels)
    if p.ndim != 3 or p.shape != y.shape:
        raise ValueError(f"probs and labels must both be (N, T, C), got {p.shape} and {y.shape}")
    y = _require_binary("labels", y).astype(np.float32)
    _check_positive("batch_size", batch_size)
    if len(p) == 0:
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan}
    pred = (p > threshold).astype(np.float32)
    sums = {"precision": 0.0, "recall": 0.0}
    count = 0
    for sl in _batch_slices(len(p), batch_size):
        pb, yb = pred[sl], y[sl]
        n_pred = np.float32(pb.sum(dtype=np.float32))
        if n_pred == 0:
            prec = rec = 0.0
        else:
            tp = np.float32((pb * yb).sum(dtype=np.float32))
            prec = float(np.float32(tp / n_pred))
            rec = float(np.float32(tp / np.float32(yb.sum(dtype=np.float32))))
        w = len(pb) * p.shape[1]
        sums["precision"] += prec * w
        sums["recall"] += rec * w
        count += w
    prec, rec = sums["precision"] / count, sums["recall"] / count
    f1 = 2.0 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"precision": prec, "recall": rec, "f1": f1}


def cmg_micro_scores(probs: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
    """The plain alternative to ``cmg_avvp_scores``: micro precision, recall and F1 over every
    (video, segment, class) cell of the whole set at once (no per-batch averaging, no zero for a
    batch without predictions), same cells (background included) and threshold."""
    p, y = _to_numpy(probs), _to_numpy(labels)
    if p.shape != y.shape:
        raise ValueError(f"probs and labels must have one shape, got {p.shape} and {y.shape}")
    y = _require_binary("labels", y).astype(np.int64)
    pred = (p > threshold).astype(np.int64)
    tp, n_pred, n_pos = int((pred * y).sum()), int(pred.sum()), int(y.sum())
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_pos if n_pos else 0.0
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}
