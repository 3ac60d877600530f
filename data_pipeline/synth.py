"""``synth``: small *learnable* synthetic datasets written in the official raw layouts.

Each class has a visual signature (a filled shape of a class colour at a class position) and
an audio signature (a tone at a class pitch); segments without an event show only noise and
carry only noise. Tests and the demo pack these with the real packer, so the real layout
readers are exercised.
"""

from __future__ import annotations

import colorsys
import csv
import json
import os
import string

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline import vocab
from data_pipeline.schema import SAMPLE_RATE

TASKS = ("ave", "avvp", "avs-s4", "avs-ms3", "avqa")
ID_CHARS = string.ascii_letters + string.digits + "-_"


# ------------------------------------------------------------------------------ signals
def class_colour(c: int, num: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((c % num) / num, 0.9, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def class_pitch(c: int, num: int) -> float:
    return 220.0 * 2 ** (4.0 * (c % num) / max(num, 1))  # 220 Hz .. 3.5 kHz, log-spaced


def class_box(c: int, num: int, size: int, slot: int | None = None) -> tuple[int, int, int, int]:
    """Shape bounding box: the class (or an explicit left/right slot) picks the position."""
    r = size // 4
    if slot is None:
        angle = 2 * np.pi * (c % num) / max(num, 1)
        cx = size / 2 + size * 0.22 * np.cos(angle)
        cy = size / 2 + size * 0.22 * np.sin(angle)
    else:
        cx, cy = (size * 0.27 if slot == 0 else size * 0.73), size / 2
    return int(cx - r), int(cy - r), int(cx + r), int(cy + r)


def noise_image(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(40, 90, size=(1, 1, 3))
    arr = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def draw_objects(img: Image.Image, objects: list[tuple[int, int, int | None]]) -> np.ndarray:
    """Draw (class, num_classes, slot) shapes; returns the union mask."""
    d = ImageDraw.Draw(img)
    mask = Image.new("L", img.size, 0)
    dm = ImageDraw.Draw(mask)
    for c, num, slot in objects:
        box = class_box(c, num, img.size[0], slot)
        if c % 2 == 0:
            d.ellipse(box, fill=class_colour(c, num))
            dm.ellipse(box, fill=255)
        else:
            d.rectangle(box, fill=class_colour(c, num))
            dm.rectangle(box, fill=255)
    return np.asarray(mask) > 0


def tone(rng: np.random.Generator, pitch: float, seconds: float, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return amp * np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi))


def segment_audio(rng, segments: int, active: list[list[tuple[int, int]]]) -> np.ndarray:
    """``active[t]`` = (class, num_classes) pairs sounding in segment t, plus light noise."""
    out = []
    for t in range(segments):
        seg = rng.normal(0, 0.02, SAMPLE_RATE)
        for c, num in active[t]:
            seg = seg + tone(rng, class_pitch(c, num), 1.0, 0.4 / max(1, len(active[t])))
        out.append(seg)
    return np.clip(np.concatenate(out), -1, 1).astype(np.float32)


def new_id(rng: np.random.Generator, length: int = 11) -> str:
    return "".join(ID_CHARS[i] for i in rng.integers(0, len(ID_CHARS), length))


def split_sizes(n: int) -> dict[str, int]:
    held = max(2, n // 4)
    return {"train": n, "val": held, "test": held}


def save_jpg(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="JPEG", quality=92)


def save_npy(arr: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, arr)


def write_video(path: str, frames: list[Image.Image], wave: np.ndarray, fps: int = 2) -> None:
    """An mp4 (MPEG-4 part 2 video, AAC audio) via PyAV; ``frames`` cover the clip evenly."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    size = frames[0].size[0]
    with av.open(path, "w") as container:
        vs = container.add_stream("mpeg4", rate=fps)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        a_s = container.add_stream("aac", rate=SAMPLE_RATE)
        a_s.layout = "mono"
        for img in frames:
            for packet in vs.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
        step = 1024
        for i in range(0, pcm.size, step):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + step], format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = i
            for packet in a_s.encode(frame):
                container.mux(packet)
        for packet in a_s.encode():
            container.mux(packet)


def save_clip(frames: list[Image.Image], wave: np.ndarray, videos: bool, video_path: str,
              frame_dir: str, wave_path: str, fps: int) -> None:
    """One clip as an mp4 (``videos``) or as a frame directory + a wave ``.npy``."""
    if videos:
        write_video(video_path, frames, wave, fps=fps)
        return
    for k, img in enumerate(frames):
        save_jpg(img, os.path.join(frame_dir, f"{k + 1:08d}.jpg"))
    save_npy(wave, wave_path)


def render_clip(rng, size: int, n_files: int, segments: int, visible,
                official_sampling: bool = True) -> list[Image.Image]:
    """``n_files`` frames evenly over the clip; ``visible(t)`` lists the objects of segment t.
    With ``official_sampling`` the files that the official frame sampler (1-based
    ⌊linspace(1, n, T)⌋) picks show exactly their segment (for frame directories; a video's
    frames keep their true times)."""
    picked = ({int(i) - 1: t for t, i in enumerate(np.floor(np.linspace(1, n_files, segments)))}
              if official_sampling else {})
    frames = []
    for i in range(n_files):
        t = picked.get(i, min(segments - 1, int(i * segments / n_files)))
        img = noise_image(rng, size)
        draw_objects(img, visible(t))
        frames.append(img)
    return frames


# ------------------------------------------------------------------------------ AVE
def synth_ave(out: str, n: int, rng: np.random.Generator, num_classes: int, size: int,
              videos: bool) -> None:
    cats = vocab.AVE_CATEGORIES
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
            on = lambda t: start <= t < end  # noqa: E731
            # 12 files exercise the official frame sampling; a video gets 2 fps
            n_files = 20 if videos else 12
            frames = render_clip(rng, size, n_files, 10,
                                 lambda t: [(c, num_classes, None)] if on(t) else [],
                                 official_sampling=not videos)
            wave = segment_audio(rng, 10, [[(c, num_classes)] if on(t) else [] for t in range(10)])
            save_clip(frames, wave, videos, os.path.join(out, "videos", vid + ".mp4"),
                      os.path.join(out, "frames", vid), os.path.join(out, "wave", vid + ".npy"), 2)
            rows.append(f"{cats[c]}&{vid}&good&{start}&{end}")
        with open(os.path.join(out, f"{split}Set.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")
        all_rows += rows
    with open(os.path.join(out, "Annotations.txt"), "w") as f:
        f.write("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(all_rows) + "\n")


# ------------------------------------------------------------------------------ AVVP
def synth_avvp(out: str, n: int, rng, num_classes: int, size: int, videos: bool) -> None:
    cats = vocab.AVVP_CATEGORIES
    llp = os.path.join(out, "LLP_dataset")
    eval_a, eval_v = [], []
    files = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
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
            frames = render_clip(rng, size, 10, 10, vis)
            wave = segment_audio(rng, 10, [[(c, num_classes) for c, s, e in ev_a if s <= t < e]
                                           for t in range(10)])
            feats = rng.normal(0, 0.1, (10, 512)).astype(np.float32)
            for c, s, e in ev_v:
                feats[s:e, c * 8:(c + 1) * 8] += 1.0
            save_clip(frames, wave, videos, os.path.join(out, "videos", name + ".mp4"),
                      os.path.join(llp, "frame", ytid), os.path.join(llp, "wave", ytid + ".npy"), 1)
            save_npy(feats, os.path.join(llp, "feats", "r2plus1d_18", ytid + ".npy"))
            rows.append([name, ",".join(cats[c] for c in classes)])
            if split != "train":
                eval_a += [[name, s, e, cats[c]] for c, s, e in ev_a]
                eval_v += [[name, s, e, cats[c]] for c, s, e in ev_v]
        _write_tsv(os.path.join(out, files[split]), ["filename", "event_labels"], rows)
    header = ["filename", "onset", "offset", "event_labels"]
    _write_tsv(os.path.join(out, "AVVP_eval_audio.csv"), header, eval_a)
    _write_tsv(os.path.join(out, "AVVP_eval_visual.csv"), header, eval_v)


def _write_tsv(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


# ------------------------------------------------------------------------------ AVSBench
def synth_avs(out: str, n: int, rng, num_classes: int, size: int, setting: str) -> None:
    cats = vocab.AVS_S4_CATEGORIES
    s4 = setting == "s4"
    base = os.path.join(out, "Single-source" if s4 else "Multi-sources")
    data = os.path.join(base, "s4_data" if s4 else "ms3_data")
    meta = []
    for split, count in split_sizes(n).items():
        for i in range(count):
            name = new_id(rng) + f"_{int(rng.integers(0, 9))}"
            if s4:
                c = i % num_classes
                sources = [(c, None)]
                frames_dir = os.path.join(data, "visual_frames", split, cats[c], name)
                masks_dir = os.path.join(data, "gt_masks", split, cats[c], name)
                wave_path = os.path.join(data, "wave", split, cats[c], name + ".npy")
                meta.append([name, int(rng.integers(0, 5)), cats[c], split])
            else:
                sources = [(i % num_classes, 0), (int(rng.integers(0, num_classes)), 1)]
                frames_dir = os.path.join(data, "visual_frames", name)
                masks_dir = os.path.join(data, "gt_masks", split, name)
                wave_path = os.path.join(data, "wave", split, name + ".npy")
                meta.append([name, split])
            num_masks = 1 if (s4 and split == "train") else 5
            sounding_per_t = []
            for t in range(5):
                # the sounding object(s) of each second; MS3 switches between its two sources
                sounding = sources if s4 else [sources[(t + i) % 2]]
                sounding_per_t.append(sounding)
                img = noise_image(rng, size)
                draw_objects(img, [(c, num_classes, slot) for c, slot in sources])
                mask_img = noise_image(rng, size)
                mask = draw_objects(mask_img, [(c, num_classes, slot) for c, slot in sounding])
                stem = f"{name}_{t + 1}" if s4 else f"{name}.mp4_{t + 1}"
                os.makedirs(frames_dir, exist_ok=True)
                img.save(os.path.join(frames_dir, stem + ".png"))
                if t < num_masks:
                    os.makedirs(masks_dir, exist_ok=True)
                    mpath = os.path.join(masks_dir, f"{name}_{t + 1}.png")
                    if s4:
                        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mpath)
                    else:  # MS3 ground truth is a palette PNG with object index 1
                        pal = Image.fromarray(mask.astype(np.uint8), "P")
                        pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
                        pal.save(mpath)
            wave = segment_audio(rng, 5, [[(c, num_classes) for c, _ in s] for s in sounding_per_t])
            save_npy(wave, wave_path)
    with open(os.path.join(base, "s4_meta_data.csv" if s4 else "ms3_meta_data.csv"), "w",
              newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "start", "category", "split"] if s4 else ["video_id", "split"])
        w.writerows(meta)


# ------------------------------------------------------------------------------ MUSIC-AVQA
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]
INSTRUMENTS = ["piano", "violin", "cello", "guitar", "flute", "drum", "accordion", "tuba"]


def avqa_questions(rng, objects: list[tuple[int, int]], audible: list[int]):
    """(type, question template, templ_values, answer) tuples answerable from the signals."""
    names = [INSTRUMENTS[c % len(INSTRUMENTS)] for c, _ in objects]
    target = int(rng.integers(0, len(objects)))
    absent = next(i for i in INSTRUMENTS if i not in names)
    probe = names[target] if rng.random() < 0.5 else absent
    side = "left" if objects[target][1] == 0 else "right"
    return [
        (["Audio", "Counting"], "How many instruments are sounding in the video?", [],
         NUMBER_WORDS[len(audible)]),
        (["Visual", "Counting"], "How many instruments are in the video?", [],
         NUMBER_WORDS[len(objects)]),
        (["Visual", "Location"], "Is the <Object> on the <LR> of the video?",
         [names[target], side if rng.random() < 0.5 else ("right" if side == "left" else "left")],
         None),
        (["Audio-Visual", "Existential"], "Is the <Object> in the video playing?", [probe],
         "yes" if probe in names and names.index(probe) in audible else "no"),
    ]


def synth_avqa(out: str, n: int, rng, num_classes: int, size: int, videos: bool) -> None:
    qid = 0
    for split, count in split_sizes(n).items():
        entries = []
        for i in range(count):
            vid = f"{int(rng.integers(0, 10**8)):08d}"
            k = 1 + i % 2
            objects = [(int(c), slot) for slot, c in
                       enumerate(rng.choice(min(num_classes, len(INSTRUMENTS)), k, replace=False))]
            audible = sorted(int(j) for j in rng.choice(k, 1 + int(rng.integers(0, k)), replace=False))
            n_files = 20  # a "long" video: the packer samples 10 frames uniformly
            frames = render_clip(rng, size, n_files, 10,
                                 lambda t: [(c, num_classes, slot) for c, slot in objects],
                                 official_sampling=not videos)
            wave = segment_audio(rng, 10, [[(objects[j][0], num_classes) for j in audible]] * 10)
            save_clip(frames, wave, videos, os.path.join(out, "videos", vid + ".mp4"),
                      os.path.join(out, "frames", vid), os.path.join(out, "audio_wave", vid + ".npy"), 2)
            for qtype, text, values, answer in avqa_questions(rng, objects, audible):
                if answer is None:  # the location question: is the stated side right?
                    target = [INSTRUMENTS[c % len(INSTRUMENTS)] for c, _ in objects].index(values[0])
                    answer = "yes" if ("left" if objects[target][1] == 0 else "right") == values[1] \
                        else "no"
                qid += 1
                entries.append({"video_id": vid, "question_id": qid, "type": json.dumps(qtype),
                                "question_content": text, "templ_values": json.dumps(values),
                                "question_deleted": 0, "anser": answer})
        for sub in ("json_update",) + (("json",) if split == "train" else ()):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
            with open(os.path.join(out, sub, f"avqa-{split}.json"), "w") as f:
                json.dump(entries, f, indent=1)


# ------------------------------------------------------------------------------ entry
def synth(task: str, n: int, out: str, seed: int = 0, num_classes: int | None = None,
          size: int | None = None, videos: bool = False) -> str:
    """Write a synthetic dataset of ``task`` under ``out``; returns ``out``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if n < 1:
        raise ValueError("--n must be at least 1")
    if videos and task.startswith("avs"):
        raise ValueError("--videos is not available for AVSBench (it ships frames)")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = num_classes or 4
    if task == "ave":
        synth_ave(out, n, rng, min(k, 28), size or 96, videos)
    elif task == "avvp":
        synth_avvp(out, n, rng, min(k, 25), size or 96, videos)
    elif task in ("avs-s4", "avs-ms3"):
        synth_avs(out, n, rng, min(k, 23), size or 96, task.split("-")[1])
    else:
        synth_avqa(out, n, rng, min(k, 8), size or 96, videos)
    return out
