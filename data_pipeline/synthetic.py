"""Synthetic signals shared by the datasets' generators (``Dataset.synth``): class colours,
positions and pitches, noise frames, tones, frame and clip writers.

Each class has a visual signature (a filled shape of a class colour at a class position) and
an audio signature (a tone at a class pitch); segments without an event show only noise and
carry only noise.
"""

from __future__ import annotations

import colorsys
import csv
import os
import string

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.schema import SAMPLE_RATE

ID_CHARS = string.ascii_letters + string.digits + "-_"


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


def event_clip(rng, size: int, c: int, num_classes: int, on, segments: int, videos: bool):
    """(frames, wave) of a clip whose one event, class ``c``, is seen and heard in the segments
    where ``on(t)``: 12 frame files exercise the official frame sampling, a video gets 20 (2 fps)."""
    frames = render_clip(rng, size, 20 if videos else 12, segments,
                         lambda t: [(c, num_classes, None)] if on(t) else [], official_sampling=not videos)
    wave = segment_audio(rng, segments, [[(c, num_classes)] if on(t) else [] for t in range(segments)])
    return frames, wave


def write_tsv(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
