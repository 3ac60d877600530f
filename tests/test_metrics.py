"""Tests of avmoe.metrics: hand-computed quirk cases plus literal ports of the official code.

The ``_ref_*`` functions below are line-by-line ports of the official evaluation code
(AVVP-ECCV20 utils/eval_metrics.py, AVSBench avs_s4/utils/utility.py + test.py, DG-SCT
AVE main_trans.py), generalised only where noted, so the vectorised metrics are checked
against the official loops on random inputs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avmoe.metrics import (
    AVQA_QUESTION_TYPES,
    AVVP_CATEGORIES,
    ave_accuracy,
    ave_labels_from_event_scores,
    avqa_accuracy,
    avs_fscore,
    avs_miou,
    avvp_binarize,
    avvp_gt_matrix,
    avvp_scores,
)

AVVP_KEYS = [f"{lvl}_{k}" for lvl in ("seg", "evt") for k in ("a", "v", "av", "type", "event")]


# =========================================================================== AVE


def _ref_dgsct_eval(is_event_scores, event_scores, one_hot_labels, batch_size):
    """DG-SCT AVE main_trans.py `compute_accuracy_supervised` + the running mean of `eval`."""
    mean_acc = torch.zeros(1)
    n = len(one_hot_labels)
    for batch_idx, start in enumerate(range(0, n, batch_size)):
        sl = slice(start, start + batch_size)
        labels = one_hot_labels[sl]
        _, targets = labels.max(-1)
        scores = is_event_scores[sl].sigmoid()
        scores_pos_ind = scores > 0.5
        scores_mask = scores_pos_ind == 0
        _, event_class = event_scores[sl].max(-1)
        pred = scores_pos_ind.long()
        pred *= event_class[:, None]
        pred[scores_mask] = 28
        correct = pred.eq(targets)
        acc = correct.sum().double() * (100.0 / correct.numel())
        mean_acc = (mean_acc * batch_idx + acc) / (batch_idx + 1)
    return mean_acc.item() / 100


def test_ave_micro_accuracy_hand():
    pred = np.array([[1, 2, 28], [28, 28, 3]])
    gt = np.array([[1, 2, 2], [28, 5, 3]])
    assert ave_accuracy(pred, gt) == pytest.approx(4 / 6)
    assert ave_accuracy(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(4 / 6)


def test_ave_scores_are_argmaxed_first_index_on_ties():
    # (1, 2, 3) scores; segment 0 ties classes 0 and 2 -> class 0, like torch.max.
    scores = np.array([[[0.5, 0.1, 0.5], [0.0, 0.2, 0.1]]])
    assert ave_accuracy(scores, np.array([[0, 1]])) == 1.0
    assert ave_accuracy(scores, np.array([[2, 1]])) == 0.5
    one_hot = np.eye(3)[np.array([[0, 1]])]
    assert ave_accuracy(scores, one_hot) == 1.0


def test_ave_batch_running_mean_overweights_partial_batch():
    # 3 videos x 2 segments: videos 0, 1 all right, video 2 all wrong.
    gt = np.zeros((3, 2), np.int64)
    pred = np.array([[0, 0], [0, 0], [1, 1]])
    assert ave_accuracy(pred, gt) == pytest.approx(4 / 6)
    # batches {0, 1} -> 1.0 and {2} -> 0.0: mean 0.5, not 4/6.
    assert ave_accuracy(pred, gt, batch_size=2) == pytest.approx(0.5)
    # batch size 1 (DG-SCT test mode) and one big batch both equal micro.
    assert ave_accuracy(pred, gt, batch_size=1) == pytest.approx(4 / 6)
    assert ave_accuracy(pred, gt, batch_size=10) == pytest.approx(4 / 6)


def test_ave_logit_exactly_zero_is_background():
    logits = torch.tensor([[0.0, 0.1, -0.1, 5.0], [3.0, 0.0, 2.0, -3.0]])
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.7, 0.7, 0.1]])  # video 1 ties 0 and 1 -> 0
    labels = ave_labels_from_event_scores(logits, scores)
    np.testing.assert_array_equal(labels, [[28, 1, 28, 1], [0, 28, 0, 28]])
    # (N, T, 1) logits and a custom background index.
    labels = ave_labels_from_event_scores(logits.numpy()[..., None], scores.numpy(), background=7)
    np.testing.assert_array_equal(labels, [[7, 1, 7, 1], [0, 7, 0, 7]])


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_ave_matches_dgsct_loop(batch_size):
    gen = torch.Generator().manual_seed(batch_size)
    n, t = 23, 10
    logits = torch.randn(n, t, generator=gen)
    logits[0, :3] = 0.0
    event_scores = torch.randn(n, 28, generator=gen)
    gt = torch.randint(0, 29, (n, t), generator=gen)
    gt[:, :4] = 28
    one_hot = torch.nn.functional.one_hot(gt, 29).float()
    pred = ave_labels_from_event_scores(logits, event_scores)
    ref = _ref_dgsct_eval(logits, event_scores, one_hot, batch_size)
    assert ave_accuracy(pred, one_hot, batch_size=batch_size) == pytest.approx(ref, abs=1e-6)


def test_ave_bad_input():
    with pytest.raises(ValueError):
        ave_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        ave_accuracy(np.zeros((2, 3)), np.zeros((2, 3)), batch_size=0)


# =========================================================================== AVVP


def _ref_to_vec(start, end, t):
    x = np.zeros(t)
    for i in range(start, end):
        x[i] = 1
    return x


def _ref_extract_event(seq, t):
    """eval_metrics.extract_event with the hard-coded 10 replaced by t."""
    x = []
    i = 0
    while i < t:
        if seq[i] == 1:
            start = i
            if i + 1 == t:
                i = i + 1
                end = i
                x.append(_ref_to_vec(start, end, t))
                break
            for j in range(i + 1, t):
                if seq[j] != 1:
                    i = j + 1
                    end = j
                    x.append(_ref_to_vec(start, end, t))
                    break
                else:
                    i = j + 1
                    if i == t:
                        end = i
                        x.append(_ref_to_vec(start, end, t))
                        break
        else:
            i += 1
    return x


def _ref_event_wise_metric(event_p, event_gt, thr=0.5):
    tp = fp = fn = 0
    if event_p is not None:
        for x1 in event_p:
            if event_gt is not None:
                flag = True
                for x2 in event_gt:
                    if np.sum(x1 * x2) >= thr * np.sum(x1 + x2 - x1 * x2):
                        tp += 1
                        flag = False
                        break
                if flag:
                    fp += 1
            else:
                fp += 1
    if event_gt is not None:
        for x1 in event_gt:
            if event_p is not None:
                flag = True
                for x2 in event_p:
                    if np.sum(x1 * x2) >= thr * np.sum(x1 + x2 - x1 * x2):
                        flag = False
                        break
                if flag:
                    fn += 1
            else:
                fn += 1
    return tp, fp, fn


def _ref_mean_active_f1(tp, fp, fn):
    f = []
    for ii in range(len(tp)):
        if (tp + fp)[ii] != 0 or (tp + fn)[ii] != 0:
            f.append(2 * tp[ii] / (2 * tp[ii] + (fn + fp)[ii]))
    return 1.0 if len(f) == 0 else sum(f) / len(f)  # 1.0: "all true negatives"


def _ref_segment_level(so_a, so_v, so_av, gt_a, gt_v, gt_av):
    out = {}
    counts = {}
    for k, so, gt in (("a", so_a, gt_a), ("v", so_v, gt_v), ("av", so_av, gt_av)):
        counts[k] = (
            np.sum(so * gt, axis=1),
            np.sum(so * (1 - gt), axis=1),
            np.sum((1 - so) * gt, axis=1),
        )
        out[k] = _ref_mean_active_f1(*counts[k])
    out["event"] = _ref_mean_active_f1(*(counts["a"][i] + counts["v"][i] for i in range(3)))
    return out


def _ref_event_level(so_a, so_v, so_av, gt_a, gt_v, gt_av, thr=0.5):
    c, t = so_a.shape
    counts = {}
    for k, so, gt in (("a", so_a, gt_a), ("v", so_v, gt_v), ("av", so_av, gt_av)):
        tp, fp, fn = np.zeros(c), np.zeros(c), np.zeros(c)
        for n in range(c):
            ep = _ref_extract_event(so[n, :], t) if np.sum(so[n, :]) != 0 else None
            eg = _ref_extract_event(gt[n, :], t) if np.sum(gt[n, :]) != 0 else None
            tp[n], fp[n], fn[n] = _ref_event_wise_metric(ep, eg, thr)
        counts[k] = (tp, fp, fn)
    out = {k: _ref_mean_active_f1(*v) for k, v in counts.items()}
    out["event"] = _ref_mean_active_f1(*(counts["a"][i] + counts["v"][i] for i in range(3)))
    return out


def _ref_avvp(pred_a, pred_v, gt_a, gt_v, thr=0.5):
    """main_avvp.py `eval` over (N, C, T) arrays, one video at a time."""
    per = {k: [] for k in AVVP_KEYS}
    for pa, pv, ga, gv in zip(pred_a, pred_v, gt_a, gt_v):
        pa, pv, ga, gv = (x.astype(np.float64) for x in (pa, pv, ga, gv))
        args = (pa, pv, pa * pv, ga, gv, ga * gv)
        for lvl, res in (("seg", _ref_segment_level(*args)), ("evt", _ref_event_level(*args, thr))):
            for k, v in res.items():
                per[f"{lvl}_{k}"].append(v)
    out = {k: float(np.mean(np.array(v))) for k, v in per.items() if v}
    for lvl in ("seg", "evt"):
        out[f"{lvl}_type"] = (
            100 * out[f"{lvl}_av"] + 100 * out[f"{lvl}_a"] + 100 * out[f"{lvl}_v"]
        ) / 3.0 / 100
    return out


def _one_class(pred, gt, num_classes=2):
    """(C, T) audio pred/gt with class 0 set; visual empty."""
    t = len(pred)
    pa, ga = np.zeros((num_classes, t), np.uint8), np.zeros((num_classes, t), np.uint8)
    pa[0], ga[0] = pred, gt
    return pa, np.zeros_like(pa), ga, np.zeros_like(ga)


def test_avvp_empty_video_scores_one():
    z = np.zeros((3, 25, 10), np.uint8)
    res = avvp_scores(z, z, z, z)
    assert set(res) == set(AVVP_KEYS)
    assert all(v == 1.0 for v in res.values())
    # Video 0 has one false-positive segment (F = 0), video 1 is empty (F = 1): mean 0.5.
    pa = np.zeros((2, 25, 10), np.uint8)
    pa[0, 3, 4] = 1
    res = avvp_scores(pa, z[:2], z[:2], z[:2])
    assert res["seg_a"] == pytest.approx(0.5)
    assert res["evt_a"] == pytest.approx(0.5)
    assert res["seg_v"] == res["seg_av"] == 1.0


def test_avvp_segment_f1_hand():
    # Class 0: TP 1, FP 1, FN 0 -> 2/3; class 1: inactive, not averaged in.
    res = avvp_scores(*_one_class([1, 1, 0, 0], [1, 0, 0, 0]))
    assert res["seg_a"] == pytest.approx(2 / 3)
    # Events: one predicted run [0, 2) vs GT run [0, 1): IoU 1/2 -> TP, GT matched -> 1.0.
    assert res["evt_a"] == pytest.approx(1.0)


def test_avvp_iou_exactly_half_is_a_match():
    # GT run of 2 segments, prediction covering 1 of them and nothing else: IoU 0.5 -> TP.
    res = avvp_scores(*_one_class([0, 1, 0, 0, 0], [0, 1, 1, 0, 0]))
    assert res["evt_a"] == 1.0
    assert res["seg_a"] == pytest.approx(2 / 3)
    # Partial overlap: |inter| = 2, |union| = 4.
    assert avvp_scores(*_one_class([1, 1, 1, 0, 0], [0, 1, 1, 1, 0]))["evt_a"] == 1.0


def test_avvp_iou_just_below_half_is_no_match():
    # GT run of 9, prediction of 4 inside it: IoU 4/9 < 0.5 -> FP 1, FN 1 -> 0.
    pred = [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    gt = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert avvp_scores(*_one_class(pred, gt))["evt_a"] == 0.0
    # IoU 1/3 (GT run of 3, prediction of 1).
    assert avvp_scores(*_one_class([1, 0, 0, 0], [1, 1, 1, 0]))["evt_a"] == 0.0
    # A lower threshold lets 4/9 match.
    assert avvp_scores(*_one_class(pred, gt), iou_threshold=0.4)["evt_a"] == 1.0


def test_avvp_event_matching_is_any_not_one_to_one():
    # Two predicted runs [0,2) and [3,5) vs one GT run [0,5): IoU 2/5 each -> 2 FP, 1 FN.
    assert avvp_scores(*_one_class([1, 1, 0, 1, 1], [1, 1, 1, 1, 1]))["evt_a"] == 0.0
    # Two GT runs [0,1), [2,3) and one prediction [0,3): IoU 1/3 each -> FP 1, FN 2 -> 0.
    assert avvp_scores(*_one_class([1, 1, 1, 0, 0], [1, 0, 1, 0, 0]))["evt_a"] == 0.0
    # Prediction [0,1) and [2,3) vs GT [0,1) and [2,4): TP 2 (IoU 1 and 1/2), no FN -> 1.0.
    assert avvp_scores(*_one_class([1, 0, 1, 0, 0], [1, 0, 1, 1, 0]))["evt_a"] == 1.0
    # Predicted run [0,2) matches GT [0,3) (IoU 2/3); second predicted run [4,5) matches
    # nothing -> TP 1, FP 1, FN 0 -> 2/3.
    res = avvp_scores(*_one_class([1, 1, 0, 0, 1], [1, 1, 1, 0, 0]))
    assert res["evt_a"] == pytest.approx(2 / 3)


def test_avvp_event_at_av_pools_before_f1():
    # Class 0: audio pred = GT over 4 segments (TP 4); visual one false positive (FP 1).
    c, t = 2, 4
    pa, pv, ga, gv = (np.zeros((c, t), np.uint8) for _ in range(4))
    pa[0] = ga[0] = 1
    pv[0, 0] = 1
    res = avvp_scores(pa, pv, ga, gv)
    assert res["seg_a"] == 1.0 and res["seg_v"] == 0.0
    assert res["seg_av"] == 0.0  # pred_av = pa * pv has the FP, GT_av empty
    assert res["seg_type"] == pytest.approx(1 / 3)
    # Pooled: TP 4, FP 1 -> 8/9, not the mean of a and v (0.5).
    assert res["seg_event"] == pytest.approx(8 / 9)
    # Event level: audio 1 TP, visual 1 FP -> pooled 2/3 (vs 0.5 averaged).
    assert res["evt_a"] == 1.0 and res["evt_v"] == 0.0 and res["evt_av"] == 0.0
    assert res["evt_event"] == pytest.approx(2 / 3)
    assert res["evt_type"] == pytest.approx(1 / 3)


def test_avvp_layouts_and_single_video():
    rng = np.random.default_rng(1)
    arrs = [(rng.random((4, 25, 10)) < 0.3).astype(np.uint8) for _ in range(4)]
    ref = avvp_scores(*arrs)
    ntc = avvp_scores(*[a.transpose(0, 2, 1) for a in arrs], layout="NTC")
    assert ntc == pytest.approx(ref)
    tensors = avvp_scores(*[torch.from_numpy(a).bool() for a in arrs])
    assert tensors == pytest.approx(ref)
    single = avvp_scores(*[a[2] for a in arrs])
    assert single == pytest.approx(avvp_scores(*[a[2:3] for a in arrs]))


def test_avvp_rejects_non_binary_and_bad_args():
    z = np.zeros((1, 25, 10))
    bad = z.copy()
    bad[0, 0, 0] = 0.7
    with pytest.raises(ValueError):
        avvp_scores(bad, z, z, z)
    bad[0, 0, 0] = 2
    with pytest.raises(ValueError):
        avvp_scores(z, z, z, bad)
    with pytest.raises(ValueError):
        avvp_scores(z, z, z, z[:, :, :5])
    with pytest.raises(ValueError):
        avvp_scores(z, z, z, z, layout="CTN")


@pytest.mark.parametrize(
    "seed,n,c,t", [(0, 30, 25, 10), (1, 30, 25, 10), (2, 20, 4, 7), (3, 15, 3, 1), (4, 10, 6, 16)]
)
def test_avvp_matches_official_loop(seed, n, c, t):
    rng = np.random.default_rng(seed)
    # Per-video/class densities from empty to full, so runs of every length occur.
    dens = rng.choice([0.0, 0.1, 0.4, 0.7, 1.0], size=(4, n, c, 1), p=[0.4, 0.2, 0.2, 0.15, 0.05])
    arrs = [(rng.random((n, c, t)) < dens[i]).astype(np.uint8) for i in range(4)]
    ref = _ref_avvp(*arrs)
    assert avvp_scores(*arrs) == pytest.approx(ref, abs=1e-6)
    for thr in (0.3, 0.75):
        ref = _ref_avvp(*arrs, thr=thr)
        got = avvp_scores(*arrs, iou_threshold=thr)
        assert {k: got[k] for k in ref if k.startswith("evt")} == pytest.approx(
            {k: v for k, v in ref.items() if k.startswith("evt")}, abs=1e-6
        )


def test_avvp_binarize_non_strict_both():
    frame = np.array([[0.5, 0.49, 0.9], [0.9, 0.9, 0.5]], np.float32)  # (C=2, T=3)
    video = np.array([0.5, 0.4999], np.float32)
    np.testing.assert_array_equal(avvp_binarize(frame, video), [[1, 0, 1], [0, 0, 0]])
    batch = avvp_binarize(frame[None], video[None])
    assert batch.shape == (1, 2, 3) and batch.dtype == np.uint8
    frame_ntc, video_t = torch.from_numpy(frame.T[None]), torch.from_numpy(video[None])
    ntc = avvp_binarize(frame_ntc, video_t, layout="NTC")
    np.testing.assert_array_equal(ntc[0].T, [[1, 0, 1], [0, 0, 0]])
    with pytest.raises(ValueError):
        avvp_binarize(frame[None], video[None, :1])


def test_avvp_gt_matrix_offset_exclusive():
    gt = avvp_gt_matrix([(0, 0, 3), ("Clapping", 9, 10), (2, 4, 4), (0, "5", 6.0)])
    assert gt.shape == (25, 10) and gt.dtype == np.uint8
    np.testing.assert_array_equal(gt[0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(gt[24], [0] * 9 + [1])
    assert gt[2].sum() == 0  # onset == offset: empty
    assert gt.sum() == 5
    small = avvp_gt_matrix([(1, 1, 2)], num_classes=2, num_segments=3)
    np.testing.assert_array_equal(small, [[0, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError):
        avvp_gt_matrix([(25, 0, 1)])


def test_avvp_categories():
    assert len(AVVP_CATEGORIES) == 25 == len(set(AVVP_CATEGORIES))
    assert AVVP_CATEGORIES[:3] == ["Speech", "Car", "Cheering"]
    assert AVVP_CATEGORIES[5] == "Frying_(food)" and AVVP_CATEGORIES[-1] == "Clapping"
    assert len(AVQA_QUESTION_TYPES) == 9 and AVQA_QUESTION_TYPES[0] == ("Audio", "Counting")


# =========================================================================== AVSBench


def _ref_mask_iou(pred, target, eps=1e-7, apply_sigmoid=True):
    """utility.mask_iou (its sigmoid made optional so probabilities can be fed)."""
    assert len(pred.shape) == 3 and pred.shape == target.shape
    N = pred.size(0)
    num_pixels = pred.size(-1) * pred.size(-2)
    no_obj_flag = target.sum(2).sum(1) == 0
    temp_pred = torch.sigmoid(pred) if apply_sigmoid else pred
    pred = (temp_pred > 0.5).int()
    inter = (pred * target).sum(2).sum(1)
    union = torch.max(pred, target).sum(2).sum(1)
    inter_no_obj = ((1 - target) * (1 - pred)).sum(2).sum(1)
    inter[no_obj_flag] = inter_no_obj[no_obj_flag]
    union[no_obj_flag] = num_pixels
    return torch.sum(inter / (union + eps)) / N


def _ref_eval_pr(y_pred, y, num):
    prec, recall = torch.zeros(num), torch.zeros(num)
    thlist = torch.linspace(0, 1 - 1e-10, num)
    for i in range(num):
        y_temp = (y_pred >= thlist[i]).float()
        tp = (y_temp * y).sum()
        prec[i], recall[i] = tp / (y_temp.sum() + 1e-20), tp / (y.sum() + 1e-20)
    return prec, recall


def _ref_eval_fmeasure(pred, gt, pr_num=255, apply_sigmoid=True):
    """utility.Eval_Fmeasure (file logging dropped, its sigmoid made optional)."""
    if apply_sigmoid:
        pred = torch.sigmoid(pred)
    N = pred.size(0)
    beta2 = 0.3
    avg_f, img_num = 0.0, 0
    score = torch.zeros(pr_num)
    for img_id in range(N):
        if torch.mean(gt[img_id]) == 0.0:
            continue
        prec, recall = _ref_eval_pr(pred[img_id], gt[img_id], pr_num)
        f_score = (1 + beta2) * prec * recall / (beta2 * prec + recall)
        f_score[f_score != f_score] = 0
        avg_f += f_score
        img_num += 1
        score = avg_f / img_num
    return score.max().item()


def _ref_avs_test(pred, masks, videos_per_batch, apply_sigmoid):
    """avs_s4/test.py: loader batches of videos, AverageMeter over batches."""
    v = pred.shape[0]
    step = v if videos_per_batch is None else videos_per_batch
    miou_sum, f_sum, count = 0.0, 0.0, 0
    for start in range(0, v, step):
        out = pred[start : start + step].flatten(0, 1)
        mask = masks[start : start + step].flatten(0, 1)
        miou_sum += _ref_mask_iou(out, mask, apply_sigmoid=apply_sigmoid)
        f_sum += _ref_eval_fmeasure(out, mask, apply_sigmoid=apply_sigmoid)
        count += 1
    return (miou_sum / count).item(), f_sum / count


def _frame(gt, prob):
    """One (1, 1, H, W) video from nested lists."""
    return (
        torch.tensor(prob, dtype=torch.float32)[None, None],
        torch.tensor(gt, dtype=torch.float32)[None, None],
    )


def test_miou_empty_gt_is_fraction_of_background():
    gt = torch.zeros(1, 1, 4, 4)
    prob = torch.zeros(1, 1, 4, 4)
    assert avs_miou(prob, gt) == 1.0
    prob[0, 0, 0, :3] = 0.9
    assert avs_miou(prob, gt) == pytest.approx(13 / 16)


def test_miou_strict_half_and_eps():
    prob, gt = _frame([[1, 1], [0, 0]], [[0.5, 0.5], [0.1, 0.1]])
    assert avs_miou(prob, gt) == 0.0  # 0.5 is background
    prob[0, 0, 0, 0] = 0.5001
    # inter 1, union 2.
    assert avs_miou(prob, gt) == pytest.approx(0.5)
    # Logit exactly 0 -> sigmoid 0.5 -> background.
    logits = torch.tensor([[[[0.0, 3.0], [-1.0, -1.0]]]])
    assert avs_miou(logits, gt, from_logits=True) == pytest.approx(0.5)
    # Union of 1: the 1e-7 eps survives float32 rounding.
    prob, gt = _frame([[1, 0]], [[0.9, 0.1]])
    expected = np.float32(1) / (np.float32(1) + np.float32(1e-7))
    assert expected < 1 and avs_miou(prob, gt) == float(expected)


def test_miou_batch_mean_of_means():
    # 3 one-frame videos with IoU 1, 1, 0.
    gt = torch.ones(3, 1, 2, 2)
    prob = torch.ones(3, 1, 2, 2)
    prob[2] = 0
    assert avs_miou(prob, gt, videos_per_batch=2) == pytest.approx(0.5)  # (1 + 0) / 2
    assert avs_miou(prob, gt, videos_per_batch=None) == pytest.approx(2 / 3)
    assert avs_miou(prob, gt, videos_per_batch=1) == pytest.approx(2 / 3)
    # (N, H, W) frames are N one-frame videos.
    assert avs_miou(prob[:, 0], gt[:, 0], videos_per_batch=2) == pytest.approx(0.5)


def test_fscore_threshold_grid_last_is_exactly_one():
    th = torch.linspace(0, 1 - 1e-10, 255)
    assert th.dtype == torch.float32 and th[-1].item() == 1.0
    # GT pixel at prob 1.0, background pixel just below 1: only th = 1.0 separates them.
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    prob, gt = _frame([[1, 0]], [[1.0, below_one]])
    assert avs_fscore(prob, gt) == 1.0
    # Without a prob of exactly 1.0 the best is both on: P 0.5, R 1 -> 0.65 / 1.15.
    prob, gt = _frame([[1, 0]], [[below_one, below_one]])
    assert avs_fscore(prob, gt) == pytest.approx(0.65 / 1.15, abs=1e-6)


def test_fscore_binary_masks_hand():
    # Binary prediction: max(F(all on), F(mask)). Mask: 1 TP, 1 FP, 1 FN -> P = R = 1/2.
    prob, gt = _frame([[1, 1, 0, 0]], [[1, 0, 1, 0]])
    f_mask = 1.3 * 0.25 / (0.3 * 0.5 + 0.5)
    f_all = 1.3 * 0.5 / (0.3 * 0.5 + 1)
    assert avs_fscore(prob, gt) == pytest.approx(max(f_mask, f_all), abs=1e-6)
    # All-zero probabilities: th = 0 turns every pixel on (prob >= th); above it nothing is
    # predicted, P = 0 / 1e-20 = 0 and F = 0 / 0 -> NaN -> 0.
    prob, gt = _frame([[1, 1, 0, 0]], [[0, 0, 0, 0]])
    assert avs_fscore(prob, gt) == pytest.approx(f_all, abs=1e-6)


def test_fscore_all_empty_batch_scores_zero_and_counts():
    prob = torch.zeros(2, 1, 2, 2)
    gt = torch.zeros(2, 1, 2, 2)
    gt[0, 0, 0, 0] = 1
    prob[0, 0, 0, 0] = 0.8
    # Batch 1: F = 1 (0.8 beats every other pixel); batch 2: empty GT -> 0.0, still counted.
    assert avs_fscore(prob, gt, videos_per_batch=1) == pytest.approx(0.5)
    # One batch: the empty frame is skipped.
    assert avs_fscore(prob, gt, videos_per_batch=2) == pytest.approx(1.0)
    assert avs_fscore(prob[1:], gt[1:]) == 0.0


def test_fscore_threshold_chosen_per_batch():
    # Video A wants a low threshold, video B a high one (C = A again); 1 frame, 2 pixels.
    gt = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.float32).reshape(3, 1, 1, 2)
    prob = torch.tensor([[0.9, 0.1]] * 3).reshape(3, 1, 1, 2)
    f_half_recall = 1.3 * 0.5 / (0.3 + 0.5)  # P 1, R 1/2
    f_half_prec = 1.3 * 0.5 / (0.15 + 1)  # P 1/2, R 1
    # A: th <= 0.1 -> 1, 0.1 < th <= 0.9 -> f_half_recall; B: f_half_prec, then 1.
    assert avs_fscore(prob, gt, videos_per_batch=1) == pytest.approx(1.0, abs=1e-6)
    ab = max((1 + f_half_prec) / 2, (f_half_recall + 1) / 2)
    assert avs_fscore(prob, gt, videos_per_batch=2) == pytest.approx((ab + 1) / 2, abs=1e-6)
    abc = max((2 + f_half_prec) / 3, (2 * f_half_recall + 1) / 3)
    assert avs_fscore(prob, gt, videos_per_batch=None) == pytest.approx(abc, abs=1e-6)
    values = {avs_fscore(prob, gt, videos_per_batch=k) for k in (1, 2, None)}
    assert len(values) == 3


def _random_avs(seed, v=6, t=5, h=12, w=12):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(v, t, h, w, generator=gen) * 3
    masks = (torch.rand(v, t, h, w, generator=gen) < 0.3).float()
    masks[torch.rand(v, t, generator=gen) < 0.3] = 0  # random empty frames
    masks[1] = 0  # a video whose frames are all empty
    probs = torch.rand(v, t, h, w, generator=gen)
    # Probabilities sitting exactly on grid thresholds, 0, 0.5 and 1 hit the >= edges.
    grid = torch.linspace(0, 1 - 1e-10, 255)
    on_grid = grid[torch.randint(0, 255, (v, t, h, w), generator=gen)]
    special = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (v, t, h, w), generator=gen)]
    pick = torch.rand(v, t, h, w, generator=gen)
    probs = torch.where(pick < 0.3, on_grid, torch.where(pick < 0.4, special, probs))
    return logits, probs, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vpb", [1, 4, None])
def test_avs_matches_official_loop_probs(seed, vpb):
    _, probs, masks = _random_avs(seed)
    ref_miou, ref_f = _ref_avs_test(probs, masks, vpb, apply_sigmoid=False)
    assert avs_fscore(probs, masks, videos_per_batch=vpb) == pytest.approx(ref_f, abs=1e-6)
    assert avs_miou(probs, masks, videos_per_batch=vpb) == pytest.approx(ref_miou, abs=1e-6)


@pytest.mark.parametrize("vpb", [1, 4, None])
def test_avs_matches_official_loop_logits(vpb):
    logits, _, masks = _random_avs(7, v=5)
    ref_miou, ref_f = _ref_avs_test(logits, masks, vpb, apply_sigmoid=True)
    got_f = avs_fscore(logits.numpy(), masks.numpy(), videos_per_batch=vpb, from_logits=True)
    assert got_f == pytest.approx(ref_f, abs=1e-6)
    got_miou = avs_miou(logits, masks, videos_per_batch=vpb, from_logits=True)
    assert got_miou == pytest.approx(ref_miou, abs=1e-6)


def test_avs_float32_emulation_is_bit_identical():
    # Per batch the official score is a float32 .item(); the emulation reproduces its bits.
    logits, probs, masks = _random_avs(3)
    for v in range(len(probs)):
        ref = _ref_eval_fmeasure(probs[v], masks[v], apply_sigmoid=False)
        assert avs_fscore(probs[v : v + 1], masks[v : v + 1]) == ref
        ref = _ref_eval_fmeasure(logits[v], masks[v])
        assert avs_fscore(logits[v : v + 1], masks[v : v + 1], from_logits=True) == ref
    ref_miou, _ = _ref_avs_test(probs, masks, 4, apply_sigmoid=False)
    assert avs_miou(probs, masks) == ref_miou


def test_avs_bad_input():
    with pytest.raises(ValueError):
        avs_miou(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError):
        avs_fscore(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 255.0))
    with pytest.raises(ValueError):
        avs_fscore(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), videos_per_batch=0)


# =========================================================================== MUSIC-AVQA

# avqa-test.json group sizes, in AVQA_QUESTION_TYPES order.
_AVQA_TEST_SIZES = [1022, 601, 1199, 1228, 995, 1274, 927, 1115, 824]


def test_avqa_question_types_table():
    assert AVQA_QUESTION_TYPES == [
        ("Audio", "Counting"), ("Audio", "Comparative"),
        ("Visual", "Counting"), ("Visual", "Location"),
        ("Audio-Visual", "Existential"), ("Audio-Visual", "Counting"),
        ("Audio-Visual", "Location"), ("Audio-Visual", "Comparative"),
        ("Audio-Visual", "Temporal"),
    ]  # fmt: skip


def test_avqa_overall_is_micro_not_mean_of_groups():
    # LAVisH: AQ 75.7 / VQ 80.4 / AVQ 70.4 on groups of 1623 / 2427 / 5135 questions.
    types = np.repeat(np.arange(9), _AVQA_TEST_SIZES)
    correct_per_type = {"Audio": 1229, "Visual": 1951, "Audio-Visual": 3615}
    correct = np.zeros(len(types), bool)
    for name, k in correct_per_type.items():
        idx = np.flatnonzero([AVQA_QUESTION_TYPES[i][0] == name for i in types])
        correct[idx[:k]] = True
    answers = np.zeros(len(types), np.int64)
    preds = np.where(correct, 0, 1)
    res = avqa_accuracy(preds, answers, types)
    assert len(types) == 9185
    assert round(100 * res["Audio"], 1) == 75.7
    assert round(100 * res["Visual"], 1) == 80.4
    assert round(100 * res["Audio-Visual"], 1) == 70.4
    assert res["Overall"] == pytest.approx(6795 / 9185)
    assert round(100 * res["Overall"], 1) == 74.0
    mean_of_groups = (res["Audio"] + res["Visual"] + res["Audio-Visual"]) / 3
    assert round(100 * mean_of_groups, 1) == 75.5
    # Type accuracy pools its subtypes (micro), it is not their mean.
    a_count, a_cmp = res["Audio/Counting"], res["Audio/Comparative"]
    assert res["Audio"] == pytest.approx((a_count * 1022 + a_cmp * 601) / 1623)
    assert res["Audio"] != pytest.approx((a_count + a_cmp) / 2)


def test_avqa_hand_and_key_order():
    types = [("Audio", "Counting"), ("Audio", "Counting"), ("Audio", "Comparative"),
             ("Audio-Visual", "Temporal")]  # fmt: skip
    res = avqa_accuracy(["two", "one", "yes", "left"], ["two", "two", "yes", "left"], types)
    assert list(res) == [
        "Audio/Counting", "Audio/Comparative", "Audio",
        "Visual/Counting", "Visual/Location", "Visual",
        "Audio-Visual/Existential", "Audio-Visual/Counting", "Audio-Visual/Location",
        "Audio-Visual/Comparative", "Audio-Visual/Temporal", "Audio-Visual", "Overall",
    ]  # fmt: skip
    assert res["Audio/Counting"] == 0.5
    assert res["Audio/Comparative"] == 1.0
    assert res["Audio"] == pytest.approx(2 / 3)
    assert res["Audio-Visual/Temporal"] == 1.0 and res["Audio-Visual"] == 1.0
    assert res["Overall"] == 0.75


def test_avqa_empty_groups_are_nan():
    res = avqa_accuracy([1, 2], [1, 3], [("Audio", "Counting")] * 2)
    assert res["Audio"] == 0.5
    for k in ("Visual/Counting", "Visual", "Audio-Visual/Temporal", "Audio-Visual"):
        assert math.isnan(res[k])
    res = avqa_accuracy([], [], [])
    assert all(math.isnan(v) for v in res.values())


def test_avqa_json_string_types():
    raw = ['["Audio-Visual", "Temporal"]', '["Visual", "Location"]', "['Audio', 'Comparative']"]
    pairs = [("Audio-Visual", "Temporal"), ("Visual", "Location"), ("Audio", "Comparative")]
    preds, answers = [3, 1, 0], [3, 2, 0]
    res = avqa_accuracy(preds, answers, raw)
    assert res == pytest.approx(avqa_accuracy(preds, answers, pairs), nan_ok=True)
    assert res["Audio-Visual/Temporal"] == 1.0 and res["Visual/Location"] == 0.0
    idx = torch.tensor([AVQA_QUESTION_TYPES.index(p) for p in pairs])
    assert avqa_accuracy(torch.tensor(preds), torch.tensor(answers), idx) == pytest.approx(
        res, nan_ok=True
    )
    assert avqa_accuracy(preds, answers, [json.loads(r) for r in raw[:2]] + [pairs[2]]) == (
        pytest.approx(res, nan_ok=True)
    )


def test_avqa_scores_unknown_types_and_errors():
    scores = torch.tensor([[0.1, 0.9, 0.9], [2.0, 1.0, 0.0]])  # ties -> first index
    res = avqa_accuracy(scores, [1, 0], [("Audio", "Counting"), ("Audio", "Location")])
    assert res["Audio/Counting"] == 1.0 and res["Audio"] == 1.0  # unknown pair: Overall only
    assert res["Overall"] == 1.0
    with pytest.raises(ValueError):
        avqa_accuracy([1, 2], [1], [0, 0])
    with pytest.raises(ValueError):
        avqa_accuracy([1, 2], [1, 2], [0, 9])
    with pytest.raises(ValueError):
        avqa_accuracy([1, 2], [1, 2], [0])
