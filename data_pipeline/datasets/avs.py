"""AVSBench-object (audio-visual segmentation): 5-s clips, one frame and one ground-truth mask
per second. Two datasets: ``avs-s4`` (single sound source; train has only the first frame's
mask) and ``avs-ms3`` (multiple sources).

Raw layout: ``Single-source/s4_meta_data.csv`` with ``s4_data/visual_frames/{split}/{cat}/
{name}/{name}_{1..5}.png`` and ``s4_data/gt_masks/...``; ``Multi-sources/ms3_meta_data.csv``
with ``ms3_data/visual_frames/{name}/{name}.mp4_{1..5}.png`` and ``ms3_data/gt_masks/{split}/
{name}/{name}_{1..5}.png`` (palette). Wave sources, first found wins: per-video
``wave/.../<name>.npy`` (32 kHz, 160,000 samples; our pickle-free form), the official pickled
``AVS.npy`` (only with --trust-pickle), the official 16 kHz ``audio_wav/.../<name>.wav``.

Extra members: ``m00.png`` ... (``num_masks`` of them), 1-bit PNG at ``--mask-size``.

Targets: ``masks`` (T, mask_size, mask_size) uint8 {0, 1}; ``mask_valid`` (T,) bool (which
masks exist).
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from data_pipeline import media
from data_pipeline.datasets.base import (AudioRef, Dataset, RawSample, SplitListing,
                                         read_csv_rows, register, require_file, unique_keys)
from data_pipeline.decode import decode_png_mask
from data_pipeline.errors import LayoutError, MemberError
from data_pipeline.sample import LabelError, label_field
from data_pipeline.schema import mask_member, sanitize_key
from data_pipeline.synthetic import (draw_objects, new_id, noise_image, save_npy, segment_audio,
                                     split_sizes)

# AVSBench-object S4 categories (23); MS3 has no per-video category.
S4_CATEGORIES = [
    "ambulance_siren", "baby_laughter", "cap_gun_shooting", "cat_meowing",
    "chainsawing_trees", "coyote_howling", "dog_barking", "driving_buses", "female_singing",
    "helicopter", "horse_clip-clop", "lawn_mowing", "lions_roaring", "male_speech",
    "mynah_bird_singing", "playing_acoustic_guitar", "playing_glockenspiel", "playing_piano",
    "playing_tabla", "playing_ukulele", "playing_violin", "race_car", "typing_on_computer_keyboard",
]
SEGMENTS = 5


class AVSBench(Dataset):
    """The two AVSBench-object settings; a subclass sets the directories and ``resolve``."""

    task = "avs"
    segments, demo_size, synth_max_classes = SEGMENTS, 32, len(S4_CATEGORIES)
    setting = ""
    root = ""
    meta = ""

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        if from_videos:
            raise LayoutError("--from-videos is not supported for AVSBench: its ground-truth "
                              "masks are aligned to the released frames; pack the frames")
        base = os.path.join(src, self.root)
        path = require_file(os.path.join(base, self.meta), f"AVSBench {self.setting} metadata csv")
        header, rows = read_csv_rows(path)
        if "split" not in header:
            raise LayoutError(f"{path}: expected a 'split' column in the header, got {header}")
        col_split = header.index("split")
        num_masks = 1 if (self.setting == "s4" and split == "train") else self.segments
        samples, cats = [], set()
        for lineno, row in rows:
            if len(row) != len(header):
                raise LayoutError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
            if row[col_split] != split:
                continue
            name = row[0]
            cat = row[2] if self.setting == "s4" else None
            labels = {"video_id": name, "setting": self.setting, "num_masks": num_masks}
            if cat is not None:
                labels["category"] = cat
                cats.add(cat)
            s = RawSample(key=sanitize_key(name), labels=labels)
            self.resolve(s, base, split, name, cat)
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"categories": sorted(cats)} if cats else {})

    def group(self, split: str, cat: str | None) -> tuple[str, ...]:
        """The directories that group a split's masks and waves (S4: also the category)."""
        raise NotImplementedError

    def frame_path(self, d: str, split: str, cat: str | None, name: str, t: int) -> str:
        raise NotImplementedError

    def mask_path(self, d: str, split: str, cat: str | None, name: str, k: int) -> str:
        return os.path.join(d, "gt_masks", *self.group(split, cat), name, f"{name}_{k + 1}.png")

    def resolve(self, s: RawSample, base: str, split: str, name: str, cat: str | None) -> None:
        """Set the frame, mask (``s.extra["masks"]``) and audio paths of one sample."""
        d = os.path.join(base, f"{self.setting}_data")
        s.frames = [self.frame_path(d, split, cat, name, t) for t in range(self.segments)]
        s.extra["masks"] = [self.mask_path(d, split, cat, name, k)
                            for k in range(s.labels["num_masks"])]
        g = self.group(split, cat)
        s.audio = self.wave_ref(os.path.join(d, "wave", *g), os.path.join(d, "audio_wav", *g), name)

    def wave_ref(self, wave_dir: str, wav_dir: str, name: str) -> AudioRef:
        per_video = os.path.join(wave_dir, name + ".npy")
        if os.path.exists(per_video):
            return AudioRef("npy", per_video)
        pickled = os.path.join(wave_dir, "AVS.npy")
        if os.path.exists(pickled):
            return AudioRef("pickle", pickled, name + ".wav")
        wav = os.path.join(wav_dir, name + ".wav")
        if os.path.exists(wav):
            return AudioRef("wav", wav)
        return AudioRef("npy", per_video)  # reported as missing, naming the preferred file

    # ------------------------------------------------------------------ members
    def extra_members(self, labels):
        return [mask_member(i) for i in range(int(labels["num_masks"]))]

    def encode_extra(self, sample, opts):
        return [(mask_member(k), media.encode_mask(path, sample.key, opts))
                for k, path in enumerate(sample.extra["masks"])]

    # ------------------------------------------------------------------ targets
    def target_shapes(self, spec):
        t, m = spec.segments, spec.mask_size
        return {"masks": ((t, m, m), np.dtype(np.uint8)), "mask_valid": ((t,), np.dtype(np.bool_))}

    def target_encoder(self, spec):
        t = spec.segments

        def fill(labels: dict, out: dict, i: int) -> None:
            n = int(label_field(labels, "num_masks"))
            if not 1 <= n <= t:
                raise LabelError("num_masks", f"expected 1..{t}, got {n}")
            out["mask_valid"][i] = np.arange(t) < n

        return fill

    def inference_sample(self, spec, **inputs):
        """One blank mask stands for the ground truth the model does not see."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("1", (spec.mask_size, spec.mask_size), 0).save(buf, format="PNG", optimize=False)
        return {"setting": self.setting, "num_masks": 1}, [(mask_member(0), buf.getvalue())]

    def decode_extra(self, members, labels, spec, out, i):
        masks = out["masks"][i]
        masks[:] = 0
        for t in range(int(labels.get("num_masks", 0))):
            name = mask_member(t)
            try:  # the size is checked from the header, before decoding
                m = decode_png_mask(bytes(members[name]), spec.mask_size)
            except Exception as e:
                raise MemberError(name, f"does not decode as a {spec.mask_size}x{spec.mask_size} "
                                  f"PNG (manifest mask_size; {type(e).__name__}: {e})") from None
            masks[t] = m

    # ------------------------------------------------------------------ synthetic data
    def check_synth(self, videos):
        if videos:
            raise ValueError("--videos is not available for AVSBench (it ships frames)")

    def synth(self, out, n, rng, num_classes, size, videos):
        cats = S4_CATEGORIES
        s4 = self.setting == "s4"
        base = os.path.join(out, self.root)
        data = os.path.join(base, f"{self.setting}_data")
        meta = []
        for split, count in split_sizes(n).items():
            for i in range(count):
                name = new_id(rng) + f"_{int(rng.integers(0, 9))}"
                if s4:
                    c = i % num_classes
                    cat, sources = cats[c], [(c, None)]
                    meta.append([name, int(rng.integers(0, 5)), cat, split])
                else:
                    cat = None
                    sources = [(i % num_classes, 0), (int(rng.integers(0, num_classes)), 1)]
                    meta.append([name, split])
                num_masks = 1 if (s4 and split == "train") else SEGMENTS
                sounding_per_t = []
                for t in range(SEGMENTS):
                    # the sounding object(s) of each second; MS3 switches between its two sources
                    sounding = sources if s4 else [sources[(t + i) % 2]]
                    sounding_per_t.append(sounding)
                    img = noise_image(rng, size)
                    draw_objects(img, [(c, num_classes, slot) for c, slot in sources])
                    mask_img = noise_image(rng, size)
                    mask = draw_objects(mask_img, [(c, num_classes, slot) for c, slot in sounding])
                    fpath = self.frame_path(data, split, cat, name, t)
                    os.makedirs(os.path.dirname(fpath), exist_ok=True)
                    img.save(fpath)
                    if t < num_masks:
                        mpath = self.mask_path(data, split, cat, name, t)
                        os.makedirs(os.path.dirname(mpath), exist_ok=True)
                        if s4:
                            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mpath)
                        else:  # MS3 ground truth is a palette PNG with object index 1
                            pal = Image.fromarray(mask.astype(np.uint8), "P")
                            pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
                            pal.save(mpath)
                wave = segment_audio(rng, SEGMENTS, [[(c, num_classes) for c, _ in s]
                                                     for s in sounding_per_t])
                save_npy(wave, os.path.join(data, "wave", *self.group(split, cat), name + ".npy"))
        with open(os.path.join(base, self.meta), "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["name", "start", "category", "split"] if s4 else ["video_id", "split"])
            w.writerows(meta)


@register
class AVSS4(AVSBench):
    name, setting, root, meta = "avs-s4", "s4", "Single-source", "s4_meta_data.csv"

    def group(self, split, cat):
        return split, cat

    def frame_path(self, d, split, cat, name, t):
        return os.path.join(d, "visual_frames", split, cat, name, f"{name}_{t + 1}.png")


@register
class AVSMS3(AVSBench):
    name, setting, root, meta = "avs-ms3", "ms3", "Multi-sources", "ms3_meta_data.csv"

    def group(self, split, cat):
        return (split,)

    def frame_path(self, d, split, cat, name, t):
        return os.path.join(d, "visual_frames", name, f"{name}.mp4_{t + 1}.png")
