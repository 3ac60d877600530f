"""What a dataset is to the data pipeline: the ``Dataset`` class whose hooks the generic code
(pack, verify, the streaming ingest, synth, inspect, demo) calls, the raw-sample descriptors a
layout reader returns, and the layout helpers the dataset modules share.

A dataset module (``data_pipeline/datasets/<name>.py``) subclasses ``Dataset`` and registers an
instance with ``@register``; the package imports every module in it (and the
``data_pipeline.datasets`` entry points of installed plug-ins), so one file is a new dataset.
See SCHEMA.md, "Adding a dataset".

The generic code never looks a dataset up by name inside a worker: the driver resolves it
(``get_dataset(name)``) and hands the object to the packer's worker processes and to the Ray
Data decode tasks, which unpickle it by reference to its class (the class must be importable
there, as any module on the driver's ``sys.path`` is).

Hooks, by stage (``spec`` is a ``data_pipeline.sample.SampleSpec``; ``out`` maps target names
to the preallocated target columns of a batch, ``i`` is the row):

raw layout (the packer, on the driver)
    ``list_split(src, split, from_videos=False, videos_dir=None) -> SplitListing``
packing (packer worker processes)
    ``extra_members(labels) -> list[str]``: member suffixes beyond frames, audio and ``json``;
    ``encode_extra(sample, opts) -> list[(suffix, bytes)]`` (``opts``: ``pack.PackOptions``),
    raising ``SampleError``
streaming ingest (the driver, then Ray Data decode tasks)
    ``spec_extra(manifest) -> dict`` (JSON-able, becomes ``SampleSpec.extra``);
    ``target_shapes(spec) -> {name: (per-sample shape, numpy dtype)}``;
    ``target_encoder(spec) -> fill(labels, out, i)`` (lookups built once per spec; raises
    ``LabelError``, ``data_pipeline.sample``); ``decode_extra(members, labels, spec, out, i)``
    (raises ``MemberError``, ``data_pipeline.errors``)
synthetic data and tooling
    ``check_synth(videos)``, ``synth(out, n, rng, num_classes, size, videos)``,
    ``segment_caption(labels, label_vocab, t)`` and ``inspect_omit`` (for ``inspect --png``)
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from data_pipeline.errors import LayoutError, SampleError
from data_pipeline.registry import Registry
from data_pipeline.schema import (AUDIO_FLAC_MEMBER, AUDIO_NPY_MEMBER, LABELS_MEMBER, SAMPLE_RATE,
                                  frame_member)
from data_pipeline.storage import not_a_regular_file

if TYPE_CHECKING:
    from data_pipeline.pack import PackOptions
    from data_pipeline.sample import SampleSpec

# name -> Dataset instance
DATASETS: Registry["Dataset"] = Registry("dataset")

TargetFill = Callable[[dict, dict, int], None]  # (labels, target columns, row) -> None


@dataclass(frozen=True)
class AudioRef:
    kind: str  # "npy" | "pickle" (AVSBench AVS.npy dict) | "wav" | "video"
    path: str
    entry: str = ""  # the dict key inside a pickled AVS.npy


@dataclass
class RawSample:
    key: str
    labels: dict
    frames: list[str] = field(default_factory=list)  # one path per segment
    audio: AudioRef | None = None
    video: str | None = None  # --from-videos: frames and audio come from this file
    extra: dict = field(default_factory=dict)  # the dataset's own media (its encode_extra reads it)
    error: SampleError | None = None  # found while listing (e.g. unknown label)


@dataclass
class SplitListing:
    samples: list[RawSample]
    label_vocab: dict  # goes into the manifest


class Dataset:
    """One dataset: its raw layout, shard members, targets and synthetic generator.

    Subclasses set the class attributes and implement ``list_split``, ``target_shapes``,
    ``target_encoder`` and ``synth``; the other hooks default to "nothing extra"."""

    name: str = ""  # registry name, also the manifest's "dataset" ("ave", "avs-s4", ...)
    task: str = ""  # the manifest's "task" (ave, avvp, avs, avqa)
    segments: int = 10  # T: one frame and one second of audio each
    splits: tuple[str, ...] = ("train", "val", "test")
    # whole-clip videos (10 s) vs AVQA's uniform sampling over a long video (None)
    clip_seconds: float | None = 10.0
    demo_size: int = 32  # training videos of the synthetic demo dataset (data_pipeline.demo)
    synth_max_classes: int = 4  # classes the synthetic generator can show
    inspect_omit: tuple[str, ...] = ()  # labels fields left out of inspect's caption

    def __repr__(self) -> str:
        return f"<{type(self).__name__} dataset {self.name!r}>"

    @property
    def audio_samples(self) -> int:
        """Samples of a sample's mono waveform at ``SAMPLE_RATE``."""
        return self.segments * SAMPLE_RATE

    # ------------------------------------------------------------------ raw layout
    def list_split(self, src: str, split: str, from_videos: bool = False,
                   videos_dir: str | None = None) -> SplitListing:
        """The samples (paths and labels, no media read) and label vocabulary of one split
        of the official raw layout under ``src``; raises ``LayoutError``. A problem of one
        sample (unknown label, missing frames) goes into its ``RawSample.error``."""
        raise NotImplementedError

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise LayoutError(f"{self.name}: unknown split {split!r}; expected one of "
                              f"{', '.join(self.splits)}")

    def video_path(self, src: str, videos_dir: str | None, video_id: str) -> str:
        base = videos_dir or os.path.join(src, "videos")
        for ext in (".mp4", ".mkv", ".webm", ".avi"):
            p = os.path.join(base, video_id + ext)
            if os.path.exists(p):
                return p
        return os.path.join(base, video_id + ".mp4")  # reported as missing at encode time

    @staticmethod
    def frames_from_dir(key: str, directory: str, count: int) -> tuple[list[str], SampleError | None]:
        if not os.path.isdir(directory):
            return [], SampleError(key, directory, "missing frames: directory does not exist")
        n = len([f for f in os.listdir(directory) if f.endswith(".jpg")])
        if n == 0:
            return [], SampleError(key, directory, f"no .jpg frames (expected at least {count})")
        return [os.path.join(directory, f"{i:08d}.jpg") for i in uniform_indices(n, count)], None

    def frames_and_wave(self, s: RawSample, src: str, video_id: str, frame_dir: str,
                        wave_path: str, from_videos: bool, videos_dir: str | None) -> None:
        """The media of a frame-directory layout (AVE, MUSIC-AVQA): the video file with
        ``from_videos``, else the frames sampled from ``frame_dir`` and the ``.npy`` wave."""
        if from_videos:
            s.video = self.video_path(src, videos_dir, video_id)
        else:
            s.frames, err = self.frames_from_dir(s.key, frame_dir, self.segments)
            s.error = s.error or err
            s.audio = AudioRef("npy", wave_path)

    # ------------------------------------------------------------------ shard members
    def extra_members(self, labels: dict) -> list[str]:
        """Member suffixes of a sample beyond frames, audio and ``json`` (may read the
        labels, e.g. how many masks)."""
        return []

    def members(self, labels: dict, audio_format: str = "npy") -> list[str]:
        """Every member a complete sample has, sorted as written."""
        names = [frame_member(i) for i in range(self.segments)]
        names.append(AUDIO_FLAC_MEMBER if audio_format == "flac" else AUDIO_NPY_MEMBER)
        names.append(LABELS_MEMBER)
        return sorted(names + self.extra_members(labels))

    def encode_extra(self, sample: RawSample, opts: "PackOptions") -> list[tuple[str, bytes]]:
        """The bytes of the extra members of one sample; raises ``SampleError``."""
        return []

    # ------------------------------------------------------------------ targets
    def spec_extra(self, manifest: dict) -> dict:
        """JSON-able dataset-specific fields of the split's ``SampleSpec`` (vocabulary sizes,
        vocabularies), from its manifest."""
        return {}

    def target_shapes(self, spec: "SampleSpec") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (per-sample shape, dtype) of every target of the split: the ``targets``
        of its ``AVBatch``es."""
        raise NotImplementedError

    def target_encoder(self, spec: "SampleSpec") -> TargetFill:
        """``fill(labels, out, i)`` writing the label-derived targets of row ``i`` from the
        labels json; raises ``LabelError``. Called once per decode task."""
        raise NotImplementedError

    def decode_extra(self, members: dict, labels: dict, spec: "SampleSpec", out: dict,
                     i: int) -> None:
        """Decode the extra members (``{suffix: bytes-like}``) into target columns of row
        ``i``; raises ``MemberError``."""

    # ------------------------------------------------------------------ inference
    def inference_sample(self, spec: "SampleSpec", **inputs) -> tuple[dict, list[tuple[str, bytes]]]:
        """(labels, extra members) of a sample made from a user's video for a model to predict on
        (``avmoe.predict``): labels the target encoder accepts, carrying no ground truth, and the
        extra members the model needs (``inputs``: e.g. AVQA's ``question``, AVVP's ``features``).
        Raise ``ValueError`` naming what is missing."""
        raise NotImplementedError(f"dataset {self.name!r} has no inference input (predict on its shards)")

    # ------------------------------------------------------------------ synthetic data
    def check_synth(self, videos: bool) -> None:
        """Raise ``ValueError`` if the generator cannot write this (e.g. videos)."""

    def synth(self, out: str, n: int, rng: np.random.Generator, num_classes: int, size: int,
              videos: bool) -> None:
        """Write a small learnable dataset in the raw layout under ``out``: ``n`` training
        videos (``synthetic.split_sizes``), ``num_classes`` classes, ``size``-pixel frames,
        mp4 videos instead of frames + waves with ``videos``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inspect
    def segment_caption(self, labels: dict, label_vocab: dict, t: int) -> str:
        """A short label of segment ``t`` for ``inspect --png`` ("" = none)."""
        return ""


def register(cls: type[Dataset]) -> type[Dataset]:
    """Class decorator: register an instance of ``cls`` under ``cls.name``."""
    DATASETS.add(cls.name, cls())
    return cls


# ------------------------------------------------------------------------------ layout helpers
def uniform_indices(n: int, k: int) -> list[int]:
    """1-based file indices ⌊linspace(1, n, k)⌋, as the official AVE loader samples frames."""
    return [int(i) for i in np.floor(np.linspace(1, n, k))]


def require_file(path: str, what: str) -> str:
    problem = not_a_regular_file(path)
    if problem:
        raise LayoutError(f"{what}: {path} {problem}")
    if not os.path.isfile(path):
        raise LayoutError(f"{what} not found: expected the file {path}")
    return path


def read_text(path: str, what: str = "annotation file") -> str:
    """The UTF-8 text of an annotation file (a FIFO or directory is refused, never opened);
    invalid UTF-8 is a ``LayoutError`` naming the file, the line and the byte."""
    problem = not_a_regular_file(path)
    if problem:
        raise LayoutError(f"{what}: {path} {problem}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LayoutError(f"{path}:{line}: {what} is not valid UTF-8 (byte {data[e.start]:#04x} "
                          f"at offset {e.start}; save it as UTF-8)") from None


def unique_keys(samples: list[RawSample], where: str) -> None:
    """Repeated ids (AVE lists a few videos twice, once per category) get ``__2``, ``__3``;
    two different ids that sanitise to one key are an error."""
    seen: Counter = Counter()
    owner: dict[str, str] = {}
    for s in samples:
        seen[s.key] += 1
        if seen[s.key] > 1:
            s.key = f"{s.key}__{seen[s.key]}"
        vid = str(s.labels.get("video_id"))
        if s.key in owner and owner[s.key] != vid and seen[s.key] == 1:
            raise LayoutError(f"{where}: ids {owner[s.key]!r} and {vid!r} map to the same "
                              f"shard key {s.key!r}")
        owner[s.key] = vid


def read_tsv(path: str, header: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file whose header must be ``header``."""
    rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t"))
    if not rows or [h.strip() for h in rows[0]] != header:
        got = rows[0] if rows else "an empty file"
        raise LayoutError(f"{path}: expected a tab-separated header {header}, got {got}")
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise LayoutError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                              f"{header}, got {len(row)}")
        out.append((lineno, row))
    return out


def read_csv_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) of a comma-separated file."""
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    if not rows:
        raise LayoutError(f"{path}: empty csv (expected a header with a 'split' column)")
    header = [h.strip() for h in rows[0]]
    return header, [(i, r) for i, r in enumerate(rows[1:], 2) if r and "".join(r).strip()]
