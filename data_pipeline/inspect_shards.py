"""``inspect``: a manifest summary, and one sample rendered as a PNG (frame strip,
waveform and log-mel spectrogram, labels, mask overlay for AVSBench)."""

from __future__ import annotations

import io

import numpy as np

from data_pipeline import storage
from data_pipeline.datasets import get_dataset
from data_pipeline.decode import decode_member
from data_pipeline.errors import ShardError
from data_pipeline.manifest import load_manifest, manifest_splits
from data_pipeline.schema import SAMPLE_RATE
from data_pipeline.tario import TarReadError, iter_tar_samples


def summary(url: str) -> str:
    lines = []
    for split in manifest_splits(url):
        m = load_manifest(url, split)
        vocab = m.get("label_vocab", {})
        vocab_desc = ", ".join(f"{k}: {len(v)}" for k, v in vocab.items() if isinstance(v, list))
        lines += [
            f"{url} [{split}] dataset={m['dataset']} task={m['task']} schema=v{m['schema_version']}",
            f"  samples={m['num_samples']} shards={m['num_shards']} "
            f"bytes={m['total_bytes']:,} ({m['total_bytes'] / max(m['num_samples'], 1) / 1e6:.2f} "
            f"MB/sample) skipped={m['num_skipped']}",
            f"  options: " + " ".join(f"{k}={v}" for k, v in sorted(m["options"].items())),
            f"  vocabularies: {vocab_desc or '-'}",
            f"  first keys: {', '.join(m['shards'][0]['keys'][:3])}",
        ]
        for s in m["skipped"][:5]:
            lines.append(f"  skipped {s['key']}: {s['error']}")
    if not lines:
        raise ShardError(f"{url}: no *.manifest.json found")
    return "\n".join(lines)


def find_sample(url: str, key: str | None, split: str | None = None) -> tuple[str, str, dict, dict]:
    """(split, key, decoded members, manifest) of ``key`` (default: the first sample)."""
    fs, path = storage.filesystem(url)
    for sp in [split] if split else manifest_splits(url):
        m = load_manifest(url, sp)
        for entry in m["shards"]:
            if key is not None and key not in entry["keys"]:
                continue
            shard = storage.join(path, entry["name"])
            problem = storage.not_a_regular_file(shard) if storage.is_local_fs(fs) else None
            if problem:  # a FIFO would block the read forever
                raise ShardError(f"{shard}: {problem}")
            with fs.open(shard, "rb") as f:
                try:
                    for k, members in iter_tar_samples(io.BufferedReader(f, 1 << 20), shard):
                        if key is None or k == key:
                            return sp, k, {s: decode_member(s, d) for s, d in members.items()}, m
                except TarReadError as e:
                    raise ShardError(str(e)) from None
    raise ShardError(f"{url}: no sample with key {key!r}")


def render_png(url: str, out_png: str, key: str | None = None, split: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torchaudio

    sp, key, dec, manifest = find_sample(url, key, split)
    dataset = get_dataset(manifest["dataset"])
    frames = [dec[s] for s in sorted(dec) if s.startswith("f") and s.endswith(".jpg")]
    masks = {int(s[1:3]): dec[s] for s in dec if s.startswith("m") and s.endswith(".png")}
    audio = dec.get("audio.npy", dec.get("audio.flac")).astype(np.float32) / 32768.0
    labels = dec["json"]
    t = len(frames)
    fig = plt.figure(figsize=(max(10, 1.6 * t), 7.5))
    grid = fig.add_gridspec(3, t, height_ratios=[1.2, 1, 1])
    for i, img in enumerate(frames):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(img)
        if i in masks:
            m = masks[i]
            if m.shape != img.shape[:2]:
                m = np.asarray(torch.nn.functional.interpolate(
                    torch.from_numpy(m)[None, None].float(), size=img.shape[:2]))[0, 0]
            overlay = np.zeros((*m.shape, 4))
            overlay[..., 1], overlay[..., 2], overlay[..., 3] = 1.0, 1.0, 0.55 * m  # cyan
            ax.imshow(overlay)
        caption = dataset.segment_caption(labels, manifest["label_vocab"], i)
        ax.set_title(f"{i}s" + (f" {caption}" or ""), fontsize=7)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ax.plot(np.arange(audio.size) / SAMPLE_RATE, audio, lw=0.3)
    ax.set_xlim(0, audio.size / SAMPLE_RATE)
    ax.set_ylabel("waveform")
    ax = fig.add_subplot(grid[2, :])
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=1024, hop_length=320,
                                               n_mels=64, f_min=50, f_max=14000)
    spec = 10 * torch.log10(mel(torch.from_numpy(audio)).clamp_min(1e-10))
    ax.imshow(spec.numpy(), origin="lower", aspect="auto",
              extent=(0, audio.size / SAMPLE_RATE, 0, 64))
    ax.set_ylabel("log-mel bin")
    ax.set_xlabel("seconds")
    text = label_text(labels, dataset.inspect_omit)
    fig.suptitle(f"{manifest['dataset']} [{sp}] {key}\n{text}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def label_text(labels: dict, omit: tuple[str, ...] = ()) -> str:
    keep = {k: v for k, v in labels.items() if k not in omit}
    text = ", ".join(f"{k}={v}" for k, v in sorted(keep.items()))
    return text if len(text) < 160 else text[:157] + "..."
