"""VGGSound-AVEL: the paired audio-visual clips CMG pre-trains its unified code space on (the
24K / 40K / 81K subsets of VGGSound selected for audio-visual event localisation by the CPSP line
of work; ../shared/spec/related-methods.md §3). No labels are used in training; the class is
kept for the validation retrieval metric.

Raw layout (``--src``)::

    train.csv, val.csv, test.csv     header ``video_id,label`` (comma-separated, quoted as csv
                                     quotes; the official subset lists are ``video_id, label`` csvs:
                                     split one, e.g. vggsound-avel40k.csv, into these three files)
    categories.txt                   optional: one class name per line (line = class index); else
                                     the sorted labels of train.csv
    frames/<video_id>/%08d.jpg       >= 10 frames over the 10-s clip (sampled as AVE's loader), and
    wave/<video_id>.npy              the clip's mono waveform at 32 kHz (AVE's layout); or
    videos/<video_id>.mp4            with ``pack --from-videos``

Targets: ``label`` () int64, the clip's class index.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline.datasets.base import (Dataset, RawSample, SplitListing, read_csv_rows, read_text,
                                         register, require_file, unique_keys)
from data_pipeline.errors import LayoutError, SampleError
from data_pipeline.sample import LabelError, label_field
from data_pipeline.schema import sanitize_key
from data_pipeline.synthetic import event_clip, save_clip, split_sizes, new_id

SEGMENTS = 10
HEADER = ["video_id", "label"]
# the synthetic set's class names (its class c looks and sounds like class c of the synthetic
# AVE and LLP sets: same colour, position, shape and pitch)
SYNTH_CLASSES = ["church bell", "speech", "dog barking", "airplane", "race car", "woman speaking",
                 "helicopter", "violin"]


@register
class VGGSoundAVEL(Dataset):
    name = "vggsound-avel"
    task = "cmg"
    segments, demo_size, synth_max_classes = SEGMENTS, 64, len(SYNTH_CLASSES)

    def rows(self, path: str) -> list[tuple[int, str, str]]:
        header, rows = read_csv_rows(require_file(path, "VGGSound-AVEL split csv"))
        if header != HEADER:
            raise LayoutError(f"{path}: expected the csv header {','.join(HEADER)}, got {','.join(header)}")
        out = []
        for lineno, row in rows:
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise LayoutError(f"{path}:{lineno}: expected 2 non-empty fields video_id,label; got {row}")
            out.append((lineno, row[0].strip(), row[1].strip()))
        return out

    def classes(self, src: str) -> list[str]:
        path = os.path.join(src, "categories.txt")
        if os.path.lexists(path):
            names = [ln.rstrip("\r") for ln in read_text(require_file(path, "categories.txt"),
                                                        "categories.txt").split("\n") if ln.strip()]
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})[0]
                raise LayoutError(f"{path}: category {dup!r} is listed twice; each line is one class index")
            return names
        return sorted({label for _, _, label in self.rows(os.path.join(src, "train.csv"))})

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        path = os.path.join(src, f"{split}.csv")
        classes = self.classes(src)
        index = {c: i for i, c in enumerate(classes)}
        samples = []
        for lineno, vid, label in self.rows(path):
            labels = {"video_id": vid, "label": label}
            s = RawSample(key=sanitize_key(vid), labels=labels)
            if label not in index:
                s.error = SampleError(s.key, f"{path}:{lineno}", f"unknown label {label!r}; expected one of "
                                      f"the {len(classes)} classes (categories.txt or train.csv)")
            else:
                labels["class_index"] = index[label]
            self.frames_and_wave(s, src, vid, os.path.join(src, "frames", vid),
                                 os.path.join(src, "wave", vid + ".npy"), from_videos, videos_dir)
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": classes})

    # ------------------------------------------------------------------ targets
    def spec_extra(self, manifest):
        return {"num_classes": len(manifest["label_vocab"]["classes"])}

    def target_shapes(self, spec):
        return {"label": ((), np.dtype(np.int64))}

    def target_encoder(self, spec):
        n = int(spec.extra["num_classes"])

        def fill(labels: dict, out: dict, i: int) -> None:
            c = label_field(labels, "class_index")
            if type(c) is not int or not 0 <= c < n:
                raise LabelError("class_index", f"expected a class index in 0..{n - 1}, got {c!r}")
            out["label"][i] = c

        return fill

    # ------------------------------------------------------------------ inference
    def inference_sample(self, spec, **inputs):
        return {"class_index": 0}, []  # (a placeholder: the clip's class is what is not known)

    # ------------------------------------------------------------------ synthetic data
    def synth(self, out, n, rng, num_classes, size, videos):
        """Paired clips: class c shows its shape and sounds its tone over the same seconds (the
        shared latent that makes cross-modal transfer learnable), noise elsewhere."""
        with open(os.path.join(out, "categories.txt"), "w") as f:
            f.write("\n".join(SYNTH_CLASSES[:num_classes]) + "\n")
        for split, count in split_sizes(n).items():
            lines = [",".join(HEADER)]
            for i in range(count):
                c = i % num_classes
                vid = new_id(rng)
                start = int(rng.integers(0, 4))
                end = int(rng.integers(start + 5, 11))
                frames, wave = event_clip(rng, size, c, num_classes, lambda t: start <= t < end, SEGMENTS,
                                          videos)
                save_clip(frames, wave, videos, os.path.join(out, "videos", vid + ".mp4"),
                          os.path.join(out, "frames", vid), os.path.join(out, "wave", vid + ".npy"), 2)
                lines.append(f"{vid},{SYNTH_CLASSES[c]}")
            with open(os.path.join(out, f"{split}.csv"), "w") as f:
                f.write("\n".join(lines) + "\n")

    def segment_caption(self, labels, label_vocab, t):
        return str(labels.get("label", ""))[:14] if t == 0 else ""
