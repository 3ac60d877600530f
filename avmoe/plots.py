"""PNG plots of a run (matplotlib, Agg backend: no display needed).

Every run: ``curves.png`` (training loss and the validation metric per epoch) and
``router_usage.png`` (mean routing weight of every expert in every MoE adapter, heat map).
Pictures of the test predictions are the task's (``Task.plot_predictions``), drawn with the
helpers below:

* ``plot_segment_timelines`` -- per-segment class prediction vs ground truth (AVE);
* ``plot_event_maps`` -- audio / visual event maps (class x segment), predicted vs truth (AVVP);
* ``plot_masks`` -- predicted mask over the ground truth (true positive green, false positive
  red, missed blue) (AVS).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_curves(results: dict[str, Any], out: str) -> str | None:
    hist = results.get("history") or []
    if not hist:
        return None
    plt = _plt()
    primary = results["primary_metric"]
    ep = [h["epoch"] for h in hist]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [h["train_loss"] for h in hist], "o-")
    ax[0].set(title="training loss", xlabel="epoch")
    ax[1].plot(ep, [h["val"].get(primary, np.nan) for h in hist], "o-", color="C1")
    best = results.get("best", {}).get("epoch")
    if best is not None:
        ax[1].axvline(best, ls="--", color="gray", label="best (val)")
        ax[1].legend()
    ax[1].set(title=f"validation {primary}", xlabel="epoch")
    return _save(fig, out, "curves.png")


def plot_router(usage: dict[str, list[float]], out: str) -> str | None:
    if not usage:
        return None
    plt = _plt()
    names = sorted(usage)
    width = max(len(v) for v in usage.values())
    m = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        m[i, :len(usage[n])] = usage[n]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * width, 1 + 0.22 * len(names)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xticks(range(width), [f"e{j}" for j in range(width)])
    ax.set_title("router: mean expert weight")
    fig.colorbar(im, ax=ax)
    return _save(fig, out, "router_usage.png")


def plot_segment_timelines(items, out: str, title: str, classes, background: int, n: int = 6) -> str | None:
    items = items[:n]
    if not items:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(items), 1, figsize=(7, 0.9 * len(items) + 0.6), squeeze=False)
    for ax, (key, p, t) in zip(axes[:, 0], items):
        pred = np.asarray(p["labels"]).reshape(-1)
        gt = np.asarray(t["segment_labels"]).reshape(-1)
        ax.imshow(np.stack([gt, pred]), aspect="auto", cmap="tab20", vmin=0, vmax=background,
                  interpolation="nearest")
        ax.set_yticks([0, 1], ["truth", "pred"], fontsize=7)
        ax.set_xticks(range(len(gt)))
        ax.set_title(f"{key}  ({background} = background)", fontsize=7)
    fig.suptitle(title, fontsize=8)
    return _save(fig, out, "timeline.png")


def plot_event_maps(items, out: str, title: str, n: int = 3) -> str | None:
    from avmoe.metrics import avvp_binarize

    items = items[:n]
    if not items:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(items), 4, figsize=(10, 2.2 * len(items)), squeeze=False)
    for row, (key, p, t) in zip(axes, items):
        video = np.asarray(p["video_prob"])
        maps = {}
        for mod, k in (("audio", "audio_frame_prob"), ("visual", "visual_frame_prob")):
            maps[mod] = avvp_binarize(np.asarray(p[k]), video, layout="NTC").transpose(0, 2, 1)[0]
        panels = [("audio pred", maps["audio"]), ("audio truth", np.asarray(t["gt_audio"])[0]),
                  ("visual pred", maps["visual"]), ("visual truth", np.asarray(t["gt_visual"])[0])]
        for ax, (panel, m) in zip(row, panels):
            ax.imshow(m, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{key[:12]} {panel}", fontsize=7)
            ax.set_xlabel("segment", fontsize=6)
            ax.set_ylabel("class", fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save(fig, out, "timeline.png")


def plot_masks(items, out: str, title: str, n: int = 4) -> str | None:
    import torch
    import torch.nn.functional as F

    items = items[:n]
    if not items:
        return None
    plt = _plt()
    t_max = max(int(np.asarray(t["masks"]).shape[1]) for _, _, t in items)
    fig, axes = plt.subplots(len(items), t_max, figsize=(1.6 * t_max, 1.7 * len(items)), squeeze=False)
    for row, (key, p, t) in zip(axes, items):
        gt = torch.as_tensor(np.asarray(t["masks"])[0]).float()  # (T, H, W)
        prob = torch.as_tensor(np.asarray(p["mask_prob"])[0]).float()
        if prob.shape[-2:] != gt.shape[-2:]:
            prob = F.interpolate(prob[None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[0]
        pred = (prob > 0.5).numpy()
        g = gt.numpy() > 0.5
        for j, ax in enumerate(row):
            ax.axis("off")
            if j >= g.shape[0]:
                continue
            img = np.zeros((*g.shape[1:], 3))
            img[pred[j] & g[j]] = (0.1, 0.8, 0.1)
            img[pred[j] & ~g[j]] = (0.9, 0.1, 0.1)
            img[~pred[j] & g[j]] = (0.1, 0.3, 0.9)
            ax.imshow(img)
            ax.set_title(f"{key[:10]} t{j}", fontsize=6)
    fig.suptitle(f"{title}: prediction over truth (green TP, red FP, blue missed)", fontsize=8)
    return _save(fig, out, "masks.png")


def plot_run(results: dict[str, Any], items, task, out: str) -> list[str]:
    """Every picture of a finished run into ``out``: the curves, the router heat map and the
    task's pictures of its test predictions."""
    os.makedirs(out, exist_ok=True)
    paths = [plot_curves(results, out), plot_router(results.get("router_usage") or {}, out)]
    if items:
        paths += task.plot_predictions(items, out, title=f"{results['run_name']} [test]")
    return [p for p in paths if p]
