"""Reading raw media and encoding shard members (runs in packer worker processes).

Every encoder is deterministic: the same input and options (``pack.PackOptions``) give the
same bytes.
"""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.errors import SampleError
from data_pipeline.schema import AUDIO_FLAC_MEMBER, AUDIO_NPY_MEMBER, MAX_IMAGE_PIXELS, SAMPLE_RATE
from data_pipeline.storage import not_a_regular_file

if TYPE_CHECKING:
    from data_pipeline.pack import PackOptions


# ----------------------------------------------------------------------------- source files
def require_source_file(path: str, key: str, what: str) -> None:
    """A source file must exist and be a regular file (a FIFO would block the packer forever,
    a directory fails obscurely)."""
    if not os.path.lexists(path):
        raise SampleError(key, path, f"missing {what}: file does not exist")
    problem = not_a_regular_file(path)
    if problem:
        raise SampleError(key, path, f"{what} {problem}")
    if not os.path.exists(path):
        raise SampleError(key, path, f"missing {what}: a dangling symlink")


def check_pixels(width: int, height: int, key: str, path: str, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise SampleError(key, path, f"{what} is {width}x{height} = {width * height:,} pixels, "
                          f"more than the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb? "
                          "data_pipeline.schema.MAX_IMAGE_PIXELS)")


# ----------------------------------------------------------------------------- images
def load_image(path: str, key: str, what: str = "frame") -> Image.Image:
    require_source_file(path, key, what)
    try:
        img = Image.open(path)  # reads the header only
        check_pixels(*img.size, key, path, f"{what} image")
        img.load()  # force a full decode so truncated files fail here, not in training
    except Image.DecompressionBombError as e:  # PIL's own, larger limit
        raise SampleError(key, path, f"{what} image refused as a decompression bomb ({e})") \
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError(key, path, f"unreadable {what} image ({e})") from None
    return img


def encode_frame(path: str, key: str, opts: PackOptions) -> bytes:
    """A JPEG of the frame at ``frame_size`` x ``frame_size`` (bicubic, no crop: the
    official AVMoE preprocessing does not keep the aspect ratio)."""
    img = load_image(path, key)
    size = (opts.frame_size, opts.frame_size)
    if img.format == "JPEG" and img.mode == "RGB" and img.size == size:
        with open(path, "rb") as f:  # already what we store: keep the bytes, no re-encode loss
            return f.read()
    return jpeg_bytes(img.convert("RGB").resize(size, Image.BICUBIC), opts.jpeg_quality)


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def binarize_mask(img: Image.Image) -> np.ndarray:
    """AVSBench masks: S4 PNGs are 0/255 grey, MS3 PNGs are palette images whose object
    index is non-zero; both become a boolean mask."""
    if img.mode == "P":
        return np.asarray(img) > 0
    return np.asarray(img.convert("L")) >= 128


def encode_mask(path: str, key: str, opts: PackOptions) -> bytes:
    mask = binarize_mask(load_image(path, key, "mask"))
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    if img.size != (opts.mask_size, opts.mask_size):
        img = img.resize((opts.mask_size, opts.mask_size), Image.NEAREST)
    buf = io.BytesIO()
    img.convert("1").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- audio
def to_int16(wave: np.ndarray) -> np.ndarray:
    """int16 as is; finite float samples clipped to [-1, 1] and scaled by 32767 (``check_wave``
    has refused every other dtype and non-finite values)."""
    if wave.dtype == np.int16:
        return wave
    w = np.clip(wave.astype(np.float64), -1.0, 1.0)
    return np.round(w * 32767.0).astype(np.int16)


def load_npy(path: str, key: str, what: str, max_elements: int | None = None) -> np.ndarray:
    """A plain ``.npy`` array (never a pickle). Its header is read first (memory-mapped) and a
    shape beyond ``max_elements`` is refused before anything is allocated."""
    require_source_file(path, key, what)
    try:
        mapped = np.load(path, allow_pickle=False, mmap_mode="r")
        if max_elements is not None and mapped.size > max_elements:
            raise SampleError(key, path, f"{what} .npy has shape {tuple(mapped.shape)} "
                              f"({mapped.size:,} values), expected at most {max_elements:,}")
        return np.array(mapped)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Python objects" in str(e):
            raise SampleError(key, path, f"{what} .npy is a pickle (object array); refusing to "
                              "unpickle it") from None
        raise SampleError(key, path, f"unreadable {what} .npy ({e})") from None
    except (OSError, EOFError) as e:
        raise SampleError(key, path, f"unreadable {what} .npy ({e})") from None


def check_wave(wave, key: str, path: str, samples: int, segments: int) -> np.ndarray:
    """The waveform of one sample as mono int16 of exactly ``samples`` values, or a
    ``SampleError`` saying what is wrong with it.

    Accepted: int16, or float (clipped to [-1, 1], scaled by 32767); mono ``(samples,)``, the
    official per-second ``(segments, 32000)`` layout, or stereo ``(2, samples)`` / ``(samples,
    2)``, down-mixed to mono by averaging the two channels (as WAV and video sources are).
    Refused: other integer widths, bool, complex, strings and objects; NaN or inf samples;
    any other shape; a wrong length."""
    wave = np.asarray(wave)
    kind = wave.dtype.kind
    if kind not in "iuf" or (kind in "iu" and wave.dtype != np.int16):
        raise SampleError(key, path, f"audio has dtype {wave.dtype} (expected int16 or float "
                          "samples)")
    if wave.ndim == 2:
        if wave.shape == (segments, SAMPLE_RATE):  # official (T, 32000) layout
            wave = wave.reshape(-1)
        elif 2 in wave.shape and wave.size == 2 * samples:
            mix = wave.astype(np.float64).mean(axis=0 if wave.shape[0] == 2 else 1)
            wave = np.round(mix).astype(np.int16) if kind != "f" else mix
    if wave.ndim != 1:
        raise SampleError(key, path, f"audio must be mono ({samples},), ({segments}, "
                          f"{SAMPLE_RATE}) or stereo (2, {samples}) / ({samples}, 2); got shape "
                          f"{tuple(wave.shape)}")
    if wave.shape[0] != samples:
        kind_ = "short" if wave.shape[0] < samples else "long"
        raise SampleError(key, path, f"audio too {kind_}: expected exactly {samples} samples "
                          f"({samples // SAMPLE_RATE} s at {SAMPLE_RATE} Hz), got {wave.shape[0]}")
    if kind == "f":
        bad = ~np.isfinite(wave)
        if bad.any():
            raise SampleError(key, path, f"audio has {int(bad.sum())} non-finite samples (NaN "
                              f"or inf; the first at sample {int(np.flatnonzero(bad)[0])})")
    return to_int16(wave)


def load_pickled_wave(path: str, entry: str, key: str, trust_pickle: bool) -> np.ndarray:
    """The official AVSBench ``AVS.npy``: a pickled dict {"<name>.wav": samples}."""
    if not trust_pickle:
        raise SampleError(key, path, "this AVS.npy wave file is a Python pickle, which can run "
                          "arbitrary code when loaded; pass --trust-pickle if you trust its "
                          "source, or provide per-video <name>.npy waves instead")
    require_source_file(path, key, "audio")
    table = np.load(path, allow_pickle=True)
    table = table.item() if isinstance(table, np.ndarray) and table.dtype == object else table
    if not isinstance(table, dict) or entry not in table:
        raise SampleError(key, path, f"AVS.npy has no entry {entry!r}")
    return np.asarray(table[entry])


def load_wav_resampled(path: str, key: str) -> np.ndarray:
    """A PCM ``.wav`` (any rate; AVSBench ships 16 kHz) as float mono at 32 kHz."""
    import soundfile as sf

    require_source_file(path, key, "audio")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own LibsndfileError
        raise SampleError(key, path, f"unreadable wav ({e})") from None
    data = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        import torch
        import torchaudio.functional as AF

        data = AF.resample(torch.from_numpy(data), rate, SAMPLE_RATE).numpy()
    return data


def encode_audio(wave_int16: np.ndarray, audio_format: str) -> tuple[str, bytes]:
    if audio_format == "flac":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, wave_int16, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return AUDIO_FLAC_MEMBER, buf.getvalue()
    return AUDIO_NPY_MEMBER, npy_bytes(wave_int16)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ----------------------------------------------------------------------------- video
def segment_centres(duration: float, segments: int, clip_seconds: float | None) -> list[float]:
    """Centre time of each 1-s segment: consecutive seconds for a clip of ``clip_seconds``
    (AVE/AVVP: 10 s videos), else spread uniformly over the whole video (AVQA)."""
    if clip_seconds is not None:
        return [t + 0.5 for t in range(segments)]
    return [duration * (t + 0.5) / segments for t in range(segments)]


def decode_video(path: str, key: str, segments: int, clip_seconds: float | None):
    """Frames (list of PIL images, one per segment, nearest to each segment centre) and
    32 kHz mono int16 audio (one second around each centre) from a video file, via PyAV."""
    import av

    require_source_file(path, key, "video")
    try:
        with av.open(path) as container:
            vstreams = container.streams.video
            astreams = container.streams.audio
            if not vstreams or not astreams:
                raise SampleError(key, path, "video needs one video and one audio stream; found "
                                  f"{len(vstreams)} video, {len(astreams)} audio")
            ctx = vstreams[0].codec_context
            check_pixels(int(ctx.width or 0), int(ctx.height or 0), key, path, "video frame")
            duration = float(container.duration or 0) / av.time_base
            frames: list[tuple[float, Image.Image]] = []
            for frame in container.decode(vstreams[0]):
                frames.append((float(frame.time or 0.0), frame.to_image()))
        with av.open(path) as container:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except SampleError:
        raise
    except Exception as e:  # PyAV raises many FFmpeg error types
        raise SampleError(key, path, f"undecodable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise SampleError(key, path, "video has no decodable frames")
    audio = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    duration = duration or max(frames[-1][0], audio.size / SAMPLE_RATE)
    centres = segment_centres(duration, segments, clip_seconds)
    times = np.array([t for t, _ in frames])
    picked = [frames[int(np.argmin(np.abs(times - c)))][1] for c in centres]
    need = segments * SAMPLE_RATE
    if clip_seconds is not None:
        wave = audio[:need]
    else:
        starts = [max(0, int(round((c - 0.5) * SAMPLE_RATE))) for c in centres]
        wave = np.concatenate([audio[s:s + SAMPLE_RATE] for s in starts])
    # Real clips often end a few ms early; up to 10 % is padded with silence.
    if wave.size < need:
        if wave.size < 0.9 * need:
            raise SampleError(key, path, f"audio track too short: {audio.size / SAMPLE_RATE:.2f} s "
                              f"decoded, expected {segments} s of segments")
        wave = np.pad(wave, (0, need - wave.size))
    return picked, wave
