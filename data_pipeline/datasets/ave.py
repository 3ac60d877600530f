"""AVE (audio-visual event localisation): 10-s videos, 28 event categories, one event per video.

Raw layout: ``{train,val,test}Set.txt`` (``Category&VideoID&Quality&StartTime&EndTime``),
optional ``categories.txt``; ``frames/<vid>/%08d.jpg`` + ``wave/<vid>.npy``, or
``videos/<vid>.mp4``.

Targets: ``segment_labels`` (T,) int64 in 0..28: the class index of each 1-s segment inside
[start, end), else ``BACKGROUND``.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline.datasets.base import (Dataset, RawSample, SplitListing, read_text, register,
                                         require_file, unique_keys)
from data_pipeline.errors import LayoutError, SampleError
from data_pipeline.sample import LabelError, label_field
from data_pipeline.schema import sanitize_key
from data_pipeline.synthetic import event_clip, save_clip, split_sizes, new_id

# AVE categories.txt, line number = class index; 28 = background.
CATEGORIES = [
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
    "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle",
    "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle",
    "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry",
    "Bus", "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice",
    "Accordion", "Mandolin",
]
BACKGROUND = 28
SEGMENTS = 10


def parse_ave_rows(path: str) -> list[tuple[str, str, str, int, int, int]]:
    """Rows of Annotations.txt / {train,val,test}Set.txt: (category, video_id, quality, start,
    end, line_number). The header line (``Category&VideoID&...``) is skipped."""
    rows = []
    for lineno, line in enumerate(read_text(path, "AVE annotation file").split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("&")
        if lineno == 1 and parts[0] == "Category":
            continue
        if len(parts) != 5:
            raise LayoutError(f"{path}:{lineno}: expected 5 '&'-separated fields "
                              f"Category&VideoID&Quality&StartTime&EndTime, got {len(parts)}")
        cat, vid, quality, start, end = parts
        try:
            s, e = int(start), int(end)
        except ValueError:
            raise LayoutError(f"{path}:{lineno}: StartTime/EndTime must be integers, got "
                              f"{start!r}/{end!r}") from None
        if not (0 <= s <= e <= SEGMENTS):
            raise LayoutError(f"{path}:{lineno}: need 0 <= StartTime <= EndTime <= "
                              f"{SEGMENTS}, got {s}..{e}")
        rows.append((cat, vid, quality, s, e, lineno))
    return rows


def ave_segment_labels(class_index: int, start: int, end: int,
                       segments: int = SEGMENTS) -> list[int]:
    """Segment t gets the class when start <= t < end, else background (28)."""
    return [class_index if start <= t < end else BACKGROUND for t in range(segments)]


@register
class AVE(Dataset):
    name = task = "ave"
    segments, demo_size, synth_max_classes = SEGMENTS, 48, len(CATEGORIES)
    inspect_omit = ("segment_labels",)  # inspect captions each segment with its label
    split_files = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}

    def categories(self, src: str) -> list[str]:
        """``categories.txt`` (line order = class index), else the official 28. Index
        ``BACKGROUND`` (28) is the background of every segment label, so a category cannot take
        it: more than 28 lines, or a line listed twice, is a ``LayoutError``."""
        path = os.path.join(src, "categories.txt")
        if not os.path.lexists(path):
            return list(CATEGORIES)
        cats, first = [], {}
        for lineno, line in enumerate(read_text(require_file(path, "AVE categories.txt"),
                                                "AVE categories.txt").split("\n"), 1):
            name = line.rstrip("\r")
            if not name.strip():
                continue
            if name in first:
                raise LayoutError(f"{path}:{lineno}: category {name!r} is listed twice (also on "
                                  f"line {first[name]}); each line is one class index")
            first[name] = lineno
            cats.append(name)
        if len(cats) > BACKGROUND:
            raise LayoutError(f"{path}: {len(cats)} categories, but AVE segment labels reserve "
                              f"index {BACKGROUND} for background: at most {BACKGROUND} categories "
                              f"(line {list(first.values())[BACKGROUND]} would become background)")
        return cats

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        path = require_file(os.path.join(src, self.split_files[split]), f"AVE {split} split file")
        cats = self.categories(src)
        index = {c: i for i, c in enumerate(cats)}
        samples = []
        for cat, vid, quality, start, end, lineno in parse_ave_rows(path):
            labels = {"video_id": vid, "category": cat, "quality": quality,
                      "start": start, "end": end}
            s = RawSample(key=sanitize_key(vid), labels=labels)
            if cat not in index:
                s.error = SampleError(s.key, f"{path}:{lineno}", f"unknown label {cat!r}; "
                                      f"expected one of the {len(cats)} AVE categories")
            else:
                labels["class_index"] = index[cat]
                labels["segment_labels"] = ave_segment_labels(index[cat], start, end)
            self.frames_and_wave(s, src, vid, os.path.join(src, "frames", vid),
                                 os.path.join(src, "wave", vid + ".npy"), from_videos, videos_dir)
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": cats, "background": BACKGROUND})

    # ------------------------------------------------------------------ targets
    def spec_extra(self, manifest):
        return {"num_classes": len(manifest["label_vocab"]["classes"])}

    def target_shapes(self, spec):
        return {"segment_labels": ((spec.segments,), np.dtype(np.int64))}

    def target_encoder(self, spec):
        t = spec.segments
        n = int(spec.extra.get("num_classes", BACKGROUND))
        ok = set(range(n)) | {BACKGROUND}

        def fill(labels: dict, out: dict, i: int) -> None:
            seg = label_field(labels, "segment_labels")
            if not isinstance(seg, list) or len(seg) != t or \
                    not all(type(x) is int and x in ok for x in seg):
                raise LabelError("segment_labels", f"expected {t} class indices in "
                                 f"0..{n - 1} or {BACKGROUND} (background), got {seg!r}")
            out["segment_labels"][i] = seg

        return fill

    # ------------------------------------------------------------------ inference
    def inference_sample(self, spec, **inputs):
        return {"segment_labels": [BACKGROUND] * spec.segments}, []

    # ------------------------------------------------------------------ synthetic data
    def synth(self, out, n, rng, num_classes, size, videos):
        cats = CATEGORIES
        with open(os.path.join(out, "categories.txt"), "w") as f:
            f.write("\n".join(cats) + "\n")
        all_rows = []
        for split, count in split_sizes(n).items():
            rows = []
            for i in range(count):
                c = i % num_classes
                vid = new_id(rng)
                start = int(rng.integers(0, 5))
                end = int(rng.integers(start + 3, 11))
                frames, wave = event_clip(rng, size, c, num_classes, lambda t: start <= t < end, SEGMENTS,
                                          videos)
                save_clip(frames, wave, videos, os.path.join(out, "videos", vid + ".mp4"),
                          os.path.join(out, "frames", vid), os.path.join(out, "wave", vid + ".npy"),
                          2)
                rows.append(f"{cats[c]}&{vid}&good&{start}&{end}")
            with open(os.path.join(out, f"{split}Set.txt"), "w") as f:
                f.write("\n".join(rows) + "\n")
            all_rows += rows
        with open(os.path.join(out, "Annotations.txt"), "w") as f:
            f.write("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(all_rows) + "\n")

    # ------------------------------------------------------------------ inspect
    def segment_caption(self, labels, label_vocab, t):
        seg = labels.get("segment_labels")
        if seg is None:
            return ""
        classes = label_vocab.get("classes", [])
        c = seg[t]
        return "bg" if c >= len(classes) else classes[c][:14]
