"""LLP / AVVP (audio-visual video parsing): 10-s videos, 25 classes, weak video-level labels
for training, per-modality event annotations for val/test.

Raw layout: ``AVVP_train.csv``, ``AVVP_{val,test}_pd.csv``, ``AVVP_eval_{audio,visual}.csv``
(tab-separated); ``LLP_dataset/frame/<ytid>/0000000{1..10}.jpg``, ``LLP_dataset/wave/<ytid>.npy``,
``LLP_dataset/feats/r2plus1d_18/<ytid>.npy`` (or ``videos/<name>.mp4`` for frames and audio).

Extra member: ``r2p1d.npy``, the R(2+1)D-18 clip features, float32 (T, 512).

Targets: ``video_labels`` (C,) float32 multi-hot; ``features`` (T, 512) float32; val/test also
``gt_audio`` / ``gt_visual`` (C, T) uint8, the official ground-truth matrices (offsets
exclusive).
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline import media
from data_pipeline.datasets.base import (AudioRef, Dataset, RawSample, SplitListing, read_tsv,
                                         register, require_file, unique_keys)
from data_pipeline.errors import LayoutError, MemberError, SampleError
from data_pipeline.sample import LabelError, label_field, npy_member
from data_pipeline.schema import sanitize_key
from data_pipeline.synthetic import (new_id, render_clip, save_clip, save_npy, segment_audio,
                                     split_sizes, write_tsv)

# LLP / AVVP: the list in AVVP-ECCV20 dataloader.py / main_avvp.py, in that order.
CATEGORIES = [
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce",
    "Fire_alarm", "Chainsaw", "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle",
    "Vacuum_cleaner", "Baby_laughter", "Accordion", "Lawn_mower", "Motorcycle", "Helicopter",
    "Acoustic_guitar", "Telephone_bell_ringing", "Baby_cry_infant_cry", "Blender", "Clapping",
]
SEGMENTS = 10
FEATURES_MEMBER = "r2p1d.npy"  # R(2+1)D-18 clip features, (T, FEATURES_DIM) float32
FEATURES_DIM = 512


def parse_avvp_events(path: str) -> dict[str, list[tuple[str, int, int, int]]]:
    """AVVP_eval_{audio,visual}.csv -> {filename: [(label, onset, offset, line)]}; offsets
    are exclusive integer seconds."""
    events: dict[str, list] = {}
    for lineno, (name, onset, offset, label) in read_tsv(path, ["filename", "onset", "offset",
                                                                "event_labels"]):
        try:
            on, off = int(onset), int(offset)
        except ValueError:
            raise LayoutError(f"{path}:{lineno}: onset/offset must be integers, got "
                              f"{onset!r}/{offset!r}") from None
        # Kept verbatim: the official GT fill ``gt[c, onset:offset] = 1`` makes an inverted
        # row (one real row reads 9..0) an empty event, and so does avmoe.metrics.
        if not (0 <= on <= SEGMENTS and 0 <= off <= SEGMENTS):
            raise LayoutError(f"{path}:{lineno}: onset and offset must lie in 0..{SEGMENTS}, "
                              f"got {on}..{off}")
        events.setdefault(name, []).append((label, on, off, lineno))
    return events


@register
class AVVP(Dataset):
    name = task = "avvp"
    segments, demo_size, synth_max_classes = SEGMENTS, 32, len(CATEGORIES)
    split_files = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        path = require_file(os.path.join(src, self.split_files[split]), f"AVVP {split} csv")
        index = {c: i for i, c in enumerate(CATEGORIES)}
        evaluated = split != "train"
        ev_a = ev_v = {}
        if evaluated:
            ev_a = parse_avvp_events(require_file(os.path.join(src, "AVVP_eval_audio.csv"),
                                                  "AVVP audio event annotations"))
            ev_v = parse_avvp_events(require_file(os.path.join(src, "AVVP_eval_visual.csv"),
                                                  "AVVP visual event annotations"))
        llp = os.path.join(src, "LLP_dataset")
        samples = []
        for lineno, (name, labels_field) in read_tsv(path, ["filename", "event_labels"]):
            ytid = name[:11]  # files are keyed by the YouTube id, the first 11 characters
            names = [x for x in labels_field.split(",") if x]
            labels = {"video_id": name, "youtube_id": ytid, "labels": names}
            s = RawSample(key=sanitize_key(name), labels=labels)
            unknown = [x for x in names if x not in index]
            if unknown or not names:
                s.error = SampleError(s.key, f"{path}:{lineno}", f"unknown label(s) {unknown}; "
                                      f"expected names from the 25 LLP categories" if unknown
                                      else "no event label")
            labels["label_indices"] = [index[x] for x in names if x in index]
            if evaluated:
                for field_name, table, csv_name in (("audio_events", ev_a, "AVVP_eval_audio.csv"),
                                                    ("visual_events", ev_v, "AVVP_eval_visual.csv")):
                    evs = []
                    for label, on, off, ev_line in table.get(name, []):
                        if label not in index:
                            s.error = s.error or SampleError(
                                s.key, f"{os.path.join(src, csv_name)}:{ev_line}",
                                f"unknown event label {label!r}")
                            continue
                        evs.append([index[label], on, off])
                    labels[field_name] = evs
            if from_videos:
                s.video = self.video_path(src, videos_dir, name)
            else:
                s.frames = [os.path.join(llp, "frame", ytid, f"{t + 1:08d}.jpg")
                            for t in range(self.segments)]
                s.audio = AudioRef("npy", os.path.join(llp, "wave", ytid + ".npy"))
            s.extra["features"] = os.path.join(llp, "feats", "r2plus1d_18", ytid + ".npy")
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": list(CATEGORIES)})

    # ------------------------------------------------------------------ members
    def extra_members(self, labels):
        return [FEATURES_MEMBER]

    def encode_extra(self, sample, opts):
        path, segments = sample.extra["features"], self.segments
        feats = media.load_npy(path, sample.key, "R(2+1)D features",
                               max_elements=segments * FEATURES_DIM)
        if feats.shape != (segments, FEATURES_DIM):
            raise SampleError(sample.key, path, f"R(2+1)D features must have shape "
                              f"({segments}, {FEATURES_DIM}), got {tuple(feats.shape)}")
        if feats.dtype.kind not in "iuf" or not np.isfinite(feats).all():
            raise SampleError(sample.key, path, f"R(2+1)D features must be finite numbers, got "
                              f"dtype {feats.dtype}" + (" with NaN/inf values"
                                                        if feats.dtype.kind == "f" else ""))
        return [(FEATURES_MEMBER, media.npy_bytes(feats.astype("float32")))]

    # ------------------------------------------------------------------ targets
    def spec_extra(self, manifest):
        return {"num_classes": len(manifest["label_vocab"]["classes"]),
                "with_events": manifest["split"] != "train"}

    def target_shapes(self, spec):
        t, c = spec.segments, spec.extra["num_classes"]
        out = {"video_labels": ((c,), np.dtype(np.float32)),
               "features": ((t, FEATURES_DIM), np.dtype(np.float32))}
        if spec.extra["with_events"]:
            out["gt_audio"] = ((c, t), np.dtype(np.uint8))
            out["gt_visual"] = ((c, t), np.dtype(np.uint8))
        return out

    def target_encoder(self, spec):
        t, num_classes, with_events = spec.segments, spec.extra["num_classes"], \
            spec.extra["with_events"]

        def fill(labels: dict, out: dict, i: int) -> None:
            idx = label_field(labels, "label_indices")
            row = out["video_labels"][i]
            row[:] = 0
            for c in idx:
                if not 0 <= int(c) < num_classes:
                    raise LabelError("label_indices", f"class {c} outside 0..{num_classes - 1}")
                row[int(c)] = 1.0
            if with_events:
                for name, fld in (("gt_audio", "audio_events"), ("gt_visual", "visual_events")):
                    gt = out[name][i]
                    gt[:] = 0
                    for ev in label_field(labels, fld):
                        c, on, off = (int(v) for v in ev)
                        if not 0 <= c < num_classes:
                            raise LabelError(fld, f"class {c} outside 0..{num_classes - 1}")
                        # offsets are exclusive, as the official eval loops range(on, off)
                        gt[c, max(0, on):max(0, min(off, t))] = 1

        return fill

    def decode_extra(self, members, labels, spec, out, i):
        feats = npy_member(members[FEATURES_MEMBER], FEATURES_MEMBER)
        if feats.shape != (spec.segments, FEATURES_DIM) or feats.dtype != np.float32:
            raise MemberError(FEATURES_MEMBER, f"expected float32 ({spec.segments}, "
                              f"{FEATURES_DIM}), got {feats.dtype} {tuple(feats.shape)}")
        out["features"][i] = feats

    # ------------------------------------------------------------------ inference
    def inference_sample(self, spec, features=None, **inputs):
        """``features``: the clip's R(2+1)D-18 features (T, 512) (a ``.npy`` path or an array);
        without them the model's motion stream sees zeros (and ``avmoe.predict`` says so)."""
        t = spec.segments
        if features is None:
            feats = np.zeros((t, FEATURES_DIM), np.float32)
        else:
            feats = media.load_npy(features, "video", "R(2+1)D features", max_elements=t * FEATURES_DIM) \
                if isinstance(features, str) else np.asarray(features)
            if feats.shape != (t, FEATURES_DIM) or not np.isfinite(feats).all():
                raise ValueError(f"R(2+1)D features must be finite numbers of shape ({t}, {FEATURES_DIM}); got "
                                 f"{feats.dtype} {tuple(feats.shape)}")
        labels = {"label_indices": [], "audio_events": [], "visual_events": []}
        return labels, [(FEATURES_MEMBER, media.npy_bytes(feats.astype("float32")))]

    # ------------------------------------------------------------------ synthetic data
    def synth(self, out, n, rng, num_classes, size, videos):
        cats = CATEGORIES
        llp = os.path.join(out, "LLP_dataset")
        eval_a, eval_v = [], []
        for split, count in split_sizes(n).items():
            rows = []
            for i in range(count):
                ytid = new_id(rng)
                start = int(rng.integers(0, 300))
                name = f"{ytid}_{start}_{start + 10}"
                classes = sorted({i % num_classes, int(rng.integers(0, num_classes))})
                ev_a, ev_v = [], []
                for c in classes:
                    s = int(rng.integers(0, 6))
                    ev_a.append((c, s, int(rng.integers(s + 2, 11))))
                    s = int(rng.integers(0, 6))
                    ev_v.append((c, s, int(rng.integers(s + 2, 11))))
                vis = lambda t: [(c, num_classes, None) for c, s, e in ev_v if s <= t < e]  # noqa
                frames = render_clip(rng, size, SEGMENTS, SEGMENTS, vis)
                wave = segment_audio(rng, SEGMENTS, [[(c, num_classes) for c, s, e in ev_a
                                                      if s <= t < e] for t in range(SEGMENTS)])
                feats = rng.normal(0, 0.1, (SEGMENTS, FEATURES_DIM)).astype(np.float32)
                for c, s, e in ev_v:
                    feats[s:e, c * 8:(c + 1) * 8] += 1.0
                save_clip(frames, wave, videos, os.path.join(out, "videos", name + ".mp4"),
                          os.path.join(llp, "frame", ytid), os.path.join(llp, "wave", ytid + ".npy"),
                          1)
                save_npy(feats, os.path.join(llp, "feats", "r2plus1d_18", ytid + ".npy"))
                rows.append([name, ",".join(cats[c] for c in classes)])
                if split != "train":
                    eval_a += [[name, s, e, cats[c]] for c, s, e in ev_a]
                    eval_v += [[name, s, e, cats[c]] for c, s, e in ev_v]
            write_tsv(os.path.join(out, self.split_files[split]), ["filename", "event_labels"],
                      rows)
        header = ["filename", "onset", "offset", "event_labels"]
        write_tsv(os.path.join(out, "AVVP_eval_audio.csv"), header, eval_a)
        write_tsv(os.path.join(out, "AVVP_eval_visual.csv"), header, eval_v)
