"""PNG plots of a run (matplotlib, Agg backend: no display needed). Every plot is titled with
the run, the split and the epoch it shows.

Every run: ``curves.png`` (training loss and the validation metric per epoch, the best epoch
marked) and ``router_usage.png`` (mean routing weight of every expert of every MoE adapter:
rows = adapter (paired block, position p1 around attention / p2 around the FFN, modality),
columns = experts named by kind, CMA = cross-modal, UA = unimodal). Pictures of the test
predictions are the task's (``Task.plot_predictions``), drawn with the helpers below:

* ``plot_segment_timelines`` -- per-segment class, truth above prediction, classes named in a
  colour legend (AVE);
* ``plot_event_maps`` -- audio and visual event maps (class x second) of prediction against
  truth: green both, red predicted only, blue missed; the classes named (AVVP);
* ``plot_masks`` -- the predicted mask over the video frame: green true positive, red false
  positive, blue missed (AVS).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

FRAMES = "_frames"  # avmoe.train.evaluate.FRAMES: an item's input frames, when kept
TP, FP, FN = (0.15, 0.75, 0.2), (0.9, 0.15, 0.1), (0.15, 0.35, 0.95)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _legend_patches(entries: Sequence[tuple[str, Any]]):
    from matplotlib.patches import Patch

    return [Patch(facecolor=c, edgecolor="none", label=label) for label, c in entries]


def plot_curves(results: dict[str, Any], out: str, title: str = "") -> str | None:
    hist = results.get("history") or []
    if not hist:
        return None
    plt = _plt()
    primary = results["primary_metric"]
    ep = [h["epoch"] for h in hist]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in hist], "o-")
    ax[0].set(title="training loss", xlabel="epoch", ylabel="loss (mean over the epoch)")
    ax[1].plot(ep, [h["val"].get(primary, np.nan) for h in hist], "o-", color="C1", label=f"validation {primary}")
    best = results.get("best", {}).get("epoch")
    if best is not None:
        ax[1].axvline(best, ls="--", color="gray", label=f"best: epoch {best}")
    ax[1].legend(fontsize=8)
    ax[1].set(title=f"validation {primary}", xlabel="epoch", ylabel=primary)
    from matplotlib.ticker import MaxNLocator

    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or results.get("run_name", ""), fontsize=10)
    return _save(fig, out, "curves.png")


def _adapter_sort_key(name: str):
    # b{k}_{p1|p2}_{visual|audio}: modality, then block, then position
    parts = name.split("_")
    block = int(parts[0][1:]) if parts and parts[0][1:].isdigit() else 0
    return (parts[-1] if len(parts) > 2 else "", block, parts[1] if len(parts) > 1 else "", name)


def plot_router(usage: dict[str, list[float]], out: str, title: str = "", num_cma: int | None = None,
                num_ua: int | None = None) -> str | None:
    """Rows: adapters (``b{block}_{p1|p2}_{modality}``); columns: experts in router order (the
    ``num_cma`` cross-modal ones first, then the ``num_ua`` unimodal ones)."""
    if not usage:
        return None
    plt = _plt()
    names = sorted(usage, key=_adapter_sort_key)
    width = max(len(v) for v in usage.values())
    m = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        m[i, :len(usage[n])] = usage[n]
    if num_cma is not None and num_ua is not None and num_cma + num_ua == width:
        cols = [f"CMA {j + 1}" for j in range(num_cma)] + [f"UA {j + 1}" for j in range(num_ua)]
    else:
        cols = [f"expert {j + 1}" for j in range(width)]
    rows = [n.replace("_p1_", " p1 (attn) ").replace("_p2_", " p2 (FFN) ") for n in names]
    fig, ax = plt.subplots(figsize=(3.4 + 1.1 * width, 1.4 + 0.26 * len(names)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), rows, fontsize=8)
    ax.set_xticks(range(width), cols, fontsize=9)
    ax.set_xlabel("expert (CMA = cross-modal adapter, UA = unimodal adapter)", fontsize=8)
    ax.set_ylabel("adapter: paired block, position, modality", fontsize=8)
    for i in range(len(names)):
        for j in range(width):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] < 0.5 else "black")
    ax.set_title(f"{title}\nrouter: mean routing weight per expert" if title else "router: mean routing weight",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="mean weight")
    return _save(fig, out, "router_usage.png")


def plot_segment_timelines(items, out: str, title: str, classes: Sequence[str], background: int,
                           n: int = 6) -> str | None:
    """Per video: the class of every segment, truth above prediction; a legend names the
    classes that occur (grey = background)."""
    items = items[:n]
    if not items:
        return None
    plt = _plt()
    from matplotlib.colors import ListedColormap

    seen = sorted({int(c) for _, p, t in items for c in np.concatenate(
        [np.asarray(p["labels"]).reshape(-1), np.asarray(t["segment_labels"]).reshape(-1)])} - {background})
    palette = plt.get_cmap("tab20").colors
    colour = {c: palette[k % len(palette)] for k, c in enumerate(seen)}
    colour[background] = (0.85, 0.85, 0.85)
    order = seen + [background]
    cmap = ListedColormap([colour[c] for c in order])
    index = {c: k for k, c in enumerate(order)}
    fig, axes = plt.subplots(len(items), 1, figsize=(9, 0.95 * len(items) + 1.6), squeeze=False)
    for ax, (key, p, t) in zip(axes[:, 0], items):
        pred = np.asarray(p["labels"]).reshape(-1)
        gt = np.asarray(t["segment_labels"]).reshape(-1)
        grid = np.vectorize(index.get)(np.stack([gt, pred]))
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5, interpolation="nearest")
        ax.set_yticks([0, 1], ["truth", "prediction"], fontsize=7)
        ax.set_xticks(range(len(gt)), [f"{s}" for s in range(len(gt))], fontsize=6)
        acc = float((pred == gt).mean())
        ax.set_title(f"{key}   (segment accuracy {acc:.2f})", fontsize=7, loc="left")
    axes[-1, 0].set_xlabel("second", fontsize=7)
    name = {c: (classes[c] if c < len(classes) else str(c)) for c in seen}
    entries = [(name[c], colour[c]) for c in seen] + [("background", colour[background])]
    fig.legend(handles=_legend_patches(entries), loc="lower center", ncol=min(4, len(entries)), fontsize=7,
               frameon=False)
    fig.suptitle(f"{title}: events per second", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * ((len(entries) - 1) // 4), 1, 1))
    path = os.path.join(out, "timeline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _overlap_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    img = np.ones((*pred.shape, 3))
    img[pred & truth] = TP
    img[pred & ~truth] = FP
    img[~pred & truth] = FN
    return img


def plot_event_maps(items, out: str, title: str, classes: Sequence[str] = (), n: int = 3) -> str | None:
    """Per video, audio and visual: class x second, prediction against truth; only the classes
    that occur in either are drawn, by name."""
    from avmoe.metrics import avvp_binarize

    items = items[:n]
    if not items:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(items), 2, figsize=(11, 1.0 + 1.9 * len(items)), squeeze=False)
    for row, (key, p, t) in zip(axes, items):
        video = np.asarray(p["video_prob"])
        for ax, mod, k in ((row[0], "audio", "audio_frame_prob"), (row[1], "visual", "visual_frame_prob")):
            pred = avvp_binarize(np.asarray(p[k]), video, layout="NTC").transpose(0, 2, 1)[0].astype(bool)
            truth = np.asarray(t[f"gt_{mod}"])[0].astype(bool)
            active = np.flatnonzero(pred.any(1) | truth.any(1))
            if not len(active):
                active = np.array([0])
            ax.imshow(_overlap_image(pred[active], truth[active]), aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(active)), [classes[c] if c < len(classes) else str(c) for c in active],
                          fontsize=7)
            ax.set_xticks(range(pred.shape[1]))
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"{key}  {mod} events", fontsize=8, loc="left")
            ax.set_xlabel("second", fontsize=7)
    fig.legend(handles=_legend_patches([("predicted and true", TP), ("predicted, not true", FP),
                                        ("true, missed", FN)]), loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    fig.suptitle(f"{title}: audio-visual video parsing", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = os.path.join(out, "timeline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_masks(items, out: str, title: str, n: int = 4) -> str | None:
    """Per video and frame: the predicted mask over the video frame (when the frames were kept)
    against the truth: green true positive, red false positive, blue missed."""
    import torch
    import torch.nn.functional as F

    items = items[:n]
    if not items:
        return None
    plt = _plt()
    t_max = max(int(np.asarray(t["masks"]).shape[1]) for _, _, t in items)
    fig, axes = plt.subplots(len(items), t_max, figsize=(2.1 * t_max, 2.2 * len(items) + 0.6), squeeze=False)
    for row, (key, p, t) in zip(axes, items):
        gt = torch.as_tensor(np.asarray(t["masks"])[0]).float()  # (T, H, W)
        prob = torch.as_tensor(np.asarray(p["mask_prob"])[0]).float()
        if prob.shape[-2:] != gt.shape[-2:]:
            prob = F.interpolate(prob[None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[0]
        pred, truth = (prob > 0.5).numpy(), gt.numpy() > 0.5
        valid = np.asarray(t["mask_valid"])[0] if "mask_valid" in t else np.ones(truth.shape[0], bool)
        frames = np.asarray(t[FRAMES])[0] if FRAMES in t else None
        for j, ax in enumerate(row):
            ax.axis("off")
            if j >= truth.shape[0]:
                continue
            if frames is not None and j < frames.shape[0]:
                frame = torch.as_tensor(frames[j]).permute(2, 0, 1)[None].float()
                frame = F.interpolate(frame, size=truth.shape[1:], mode="bilinear", align_corners=False)[0]
                ax.imshow(frame.permute(1, 2, 0).clamp(0, 255).numpy().astype(np.uint8))
            overlay = np.zeros((*truth.shape[1:], 4))
            overlay[..., :3] = _overlap_image(pred[j], truth[j] & bool(valid[j]))
            overlay[..., 3] = 0.55 * (pred[j] | (truth[j] & bool(valid[j])))
            ax.imshow(overlay)
            ax.set_title(f"{key[:14]}  t={j}" + ("" if valid[j] else " (no truth)"), fontsize=7)
    fig.legend(handles=_legend_patches([("mask predicted and true", TP), ("predicted, not true", FP),
                                        ("true, missed", FN)]), loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    fig.suptitle(f"{title}: predicted masks over the frames", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = os.path.join(out, "masks.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_code_usage(idx_audio: np.ndarray, idx_visual: np.ndarray, out: str, title: str) -> str:
    """CMG's codebook usage on a split: per code, the share of audio and of visual seconds that
    take it (codes sorted by total use), and per code the audio share of its uses: a unified code
    is used by both modalities (near 0.5), a modality-private one sits at 0 or 1."""
    plt = _plt()
    size = int(max(idx_audio.max(initial=0), idx_visual.max(initial=0))) + 1
    ca = np.bincount(idx_audio.reshape(-1), minlength=size).astype(float)
    cv = np.bincount(idx_visual.reshape(-1), minlength=size).astype(float)
    used = np.nonzero(ca + cv)[0]
    order = used[np.argsort(-(ca + cv)[used], kind="stable")]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(order))
    ax[0].bar(x, ca[order] / max(ca.sum(), 1), width=0.9, color="C0", label="audio seconds")
    ax[0].bar(x, cv[order] / max(cv.sum(), 1), width=0.9, bottom=ca[order] / max(ca.sum(), 1), color="C1",
              label="visual seconds")
    ax[0].set(title=f"{len(used)} codes used on this split, sorted by use", xlabel="code index",
              ylabel="share of the modality's seconds")
    ax[0].set_xticks(x[:: max(1, len(x) // 12)], [str(c) for c in order[:: max(1, len(x) // 12)]], fontsize=7)
    ax[0].legend(fontsize=8)
    share = ca[order] / np.maximum(ca[order] + cv[order], 1)
    ax[1].hist(share, bins=np.linspace(0, 1, 11), color="C2", weights=(ca + cv)[order] / max((ca + cv).sum(), 1))
    ax[1].set(title="how shared are the codes?", xlabel="audio share of a code's uses\n(0 = visual only, 1 = audio only)",
              ylabel="share of all uses")
    fig.suptitle(f"codebook usage · {title}", fontsize=10)
    return _save(fig, out, "codebook_usage.png")


def plot_clip_tracks(frames: np.ndarray, tracks: dict[str, list[list[tuple[str, float]]]], out: str, title: str,
                     name: str = "prediction.png") -> str:
    """One predicted clip: its frames on top, then per track (e.g. "event", or "audio" and
    "visual") a row per second listing the predicted classes with their confidence, each class in
    its own colour, background left blank."""
    plt = _plt()
    t = len(frames)
    labels = sorted({lab for tr in tracks.values() for sec in tr for lab, _ in sec})
    colour = {lab: plt.get_cmap("tab20")(i % 20) for i, lab in enumerate(labels)}
    rows = {track: max(1, max(len(sec) for sec in secs)) for track, secs in tracks.items()}
    heights = [max(0.9, 0.45 * r) for r in rows.values()]
    fig, axes = plt.subplots(1 + len(tracks), 1, figsize=(max(8, 1.3 * t), 2.3 + sum(heights)),
                             gridspec_kw={"height_ratios": [2.0] + heights})
    axes[0].imshow(np.concatenate(list(frames), axis=1))
    axes[0].set_xticks([(i + 0.5) * frames.shape[2] for i in range(t)], [f"{i} s" for i in range(t)], fontsize=7)
    axes[0].set_yticks([])
    from matplotlib.patches import Rectangle

    for ax, (track, secs) in zip(axes[1:], tracks.items()):
        n = rows[track]
        for i, sec in enumerate(secs):
            for j, (lab, conf) in enumerate(sec):
                ax.add_patch(Rectangle((i, n - 1 - j), 1, 1, color=colour[lab], alpha=0.35 + 0.65 * float(conf)))
                ax.text(i + 0.5, n - 0.5 - j, f"{lab[:16]} {conf:.2f}", ha="center", va="center", fontsize=6)
        ax.set(xlim=(0, t), ylim=(0, n), yticks=[], xticks=range(t + 1))
        ax.set_ylabel(track, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("second (cell: predicted class and confidence; blank: background)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out, name)


def plot_clip_answer(frames: np.ndarray, question: str, top: list[tuple[str, float]], out: str, title: str,
                     name: str = "prediction.png") -> str:
    """A question answered on a clip: the frames, the question, the top answers as bars."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(frames)), 2.4 + 0.35 * len(top)),
                             gridspec_kw={"height_ratios": [2.0, 0.35 * len(top) + 0.4]})
    axes[0].imshow(np.concatenate(list(frames), axis=1))
    axes[0].axis("off")
    axes[0].set_title(f"Q: {question}", fontsize=9)
    names, probs = [a for a, _ in top][::-1], [p for _, p in top][::-1]
    axes[1].barh(names, probs, color=["C1"] * (len(top) - 1) + ["C2"])
    for y, p in enumerate(probs):
        axes[1].text(p, y, f" {p:.2f}", va="center", fontsize=8)
    axes[1].set(xlim=(0, 1), xlabel="answer probability (top answers; green: the answer)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out, name)


def plot_clip_masks(frames: np.ndarray, masks: np.ndarray, out: str, title: str, name: str = "prediction.png") -> str:
    """Predicted masks (T, M, M) probabilities over the clip's frames (T, H, W, 3): a strip."""
    plt = _plt()
    t = len(frames)
    fig, axes = plt.subplots(1, t, figsize=(2.2 * t, 2.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        m = masks[i]
        f = frames[i].astype(np.float32) / 255
        if m.shape != f.shape[:2]:
            from PIL import Image

            m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(f.shape[1::-1], Image.BILINEAR)) / 255.0
        cyan = np.array([0.0, 1.0, 1.0])
        over = f * (1 - 0.6 * m[..., None]) + cyan * 0.6 * m[..., None]  # the mask probability as cyan
        ax.imshow(np.clip(over, 0, 1))
        ax.set_title(f"t={i}  fg {float((masks[i] > 0.5).mean()):.0%}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}\n(cyan: the predicted sounding object, as strong as its mask probability; fg: pixels > 0.5)",
                 fontsize=9)
    return _save(fig, out, name)


def plot_run(results: dict[str, Any], items, task, out: str) -> list[str]:
    """Every picture of a finished run into ``out``: the curves, the router heat map and the
    task's pictures of its test predictions (titled with the run, the split and the epoch)."""
    os.makedirs(out, exist_ok=True)
    run = results["run_name"]
    best = (results.get("best") or {}).get("epoch")
    adapter = (results.get("model_config") or {}).get("adapter") or {}
    test_title = f"{run} · {results['config']['paths']['test_split']} split · " + (
        f"best epoch {best}" if best is not None else "final weights")
    paths = [plot_curves(results, out, f"{run} · training and validation"),
             plot_router(results.get("router_usage") or {}, out, test_title, adapter.get("num_cma"),
                         adapter.get("num_ua"))]
    if items:
        paths += task.plot_predictions(items, out, title=test_title)
    return [p for p in paths if p]
