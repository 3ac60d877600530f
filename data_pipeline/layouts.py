"""Readers of the official raw layouts (../shared/spec/avmoe.md §4).

A layout parses the annotation files of one split into ``RawSample`` descriptors (paths and
labels, no media read). Parsing is separate from path resolution so that every row of the
real annotation files can be checked without the media (tests/test_real_annotations.py).
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from avmoe.registry import Registry
from data_pipeline import vocab
from data_pipeline.errors import LayoutError, SampleError
from data_pipeline.schema import SAMPLE_RATE, SEGMENTS, sanitize_key


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
    masks: list[str] = field(default_factory=list)
    features: str | None = None
    error: SampleError | None = None  # found while listing (e.g. unknown label)


@dataclass
class SplitListing:
    samples: list[RawSample]
    label_vocab: dict  # goes into the manifest


LAYOUTS: Registry[type["Layout"]] = Registry("dataset layout")


def get_layout(dataset: str) -> "Layout":
    return LAYOUTS.get(dataset)()


def uniform_indices(n: int, k: int) -> list[int]:
    """1-based file indices ⌊linspace(1, n, k)⌋, as the official AVE loader samples frames."""
    return [int(i) for i in np.floor(np.linspace(1, n, k))]


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise LayoutError(f"{what} not found: expected the file {path}")
    return path


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


class Layout:
    dataset: str = ""
    splits: tuple[str, ...] = ("train", "val", "test")
    # whole-clip videos (10 s) vs AVQA's uniform sampling over a long video
    clip_seconds: float | None = 10.0

    @property
    def segments(self) -> int:
        return SEGMENTS[self.dataset]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise LayoutError(f"{self.dataset}: unknown split {split!r}; expected one of "
                              f"{', '.join(self.splits)}")

    def list_split(self, src: str, split: str, from_videos: bool = False,
                   videos_dir: str | None = None) -> SplitListing:
        raise NotImplementedError

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


# =============================================================================== AVE
def parse_ave_rows(path: str) -> list[tuple[str, str, str, int, int, int]]:
    """Rows of Annotations.txt / {train,val,test}Set.txt: (category, video_id, quality, start,
    end, line_number). The header line (``Category&VideoID&...``) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
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
            if not (0 <= s <= e <= vocab.AVE_SEGMENTS):
                raise LayoutError(f"{path}:{lineno}: need 0 <= StartTime <= EndTime <= 10, got "
                                  f"{s}..{e}")
            rows.append((cat, vid, quality, s, e, lineno))
    return rows


def ave_segment_labels(class_index: int, start: int, end: int, segments: int = 10) -> list[int]:
    """Segment t gets the class when start <= t < end, else background (28)."""
    return [class_index if start <= t < end else vocab.AVE_BACKGROUND for t in range(segments)]


@LAYOUTS.register("ave")
class AVELayout(Layout):
    dataset = "ave"
    split_files = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}

    def categories(self, src: str) -> list[str]:
        path = os.path.join(src, "categories.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
        return list(vocab.AVE_CATEGORIES)

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
            if from_videos:
                s.video = self.video_path(src, videos_dir, vid)
            else:
                s.frames, err = self.frames_from_dir(s.key, os.path.join(src, "frames", vid),
                                                     self.segments)
                s.error = s.error or err
                s.audio = AudioRef("npy", os.path.join(src, "wave", vid + ".npy"))
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": cats, "background": vocab.AVE_BACKGROUND})


# =============================================================================== AVVP
def read_tsv(path: str, header: list[str]) -> list[tuple[int, list[str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
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
        if not (0 <= on <= vocab.AVVP_SEGMENTS and 0 <= off <= vocab.AVVP_SEGMENTS):
            raise LayoutError(f"{path}:{lineno}: onset and offset must lie in 0..10, got "
                              f"{on}..{off}")
        events.setdefault(name, []).append((label, on, off, lineno))
    return events


@LAYOUTS.register("avvp")
class AVVPLayout(Layout):
    dataset = "avvp"
    split_files = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        path = require_file(os.path.join(src, self.split_files[split]), f"AVVP {split} csv")
        index = {c: i for i, c in enumerate(vocab.AVVP_CATEGORIES)}
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
            s.features = os.path.join(llp, "feats", "r2plus1d_18", ytid + ".npy")
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"classes": list(vocab.AVVP_CATEGORIES)})


# =============================================================================== AVSBench
def read_csv_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise LayoutError(f"{path}: empty csv (expected a header with a 'split' column)")
    header = [h.strip() for h in rows[0]]
    return header, [(i, r) for i, r in enumerate(rows[1:], 2) if r and "".join(r).strip()]


class AVSLayout(Layout):
    """AVSBench-object. Wave sources, first found wins: per-video ``wave/.../<name>.npy``
    (32 kHz, 160,000 samples; our pickle-free form), the official pickled ``AVS.npy``
    (only with --trust-pickle), the official 16 kHz ``audio_wav/.../<name>.wav``."""

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

    def resolve(self, s: RawSample, base: str, split: str, name: str, cat: str | None) -> None:
        raise NotImplementedError

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


@LAYOUTS.register("avs-s4")
class AVSS4Layout(AVSLayout):
    dataset, setting, root, meta = "avs-s4", "s4", "Single-source", "s4_meta_data.csv"

    def resolve(self, s, base, split, name, cat):
        d = os.path.join(base, "s4_data")
        s.frames = [os.path.join(d, "visual_frames", split, cat, name, f"{name}_{t + 1}.png")
                    for t in range(self.segments)]
        s.masks = [os.path.join(d, "gt_masks", split, cat, name, f"{name}_{k + 1}.png")
                   for k in range(s.labels["num_masks"])]
        s.audio = self.wave_ref(os.path.join(d, "wave", split, cat),
                                os.path.join(d, "audio_wav", split, cat), name)


@LAYOUTS.register("avs-ms3")
class AVSMS3Layout(AVSLayout):
    dataset, setting, root, meta = "avs-ms3", "ms3", "Multi-sources", "ms3_meta_data.csv"

    def resolve(self, s, base, split, name, cat):
        d = os.path.join(base, "ms3_data")
        s.frames = [os.path.join(d, "visual_frames", name, f"{name}.mp4_{t + 1}.png")
                    for t in range(self.segments)]
        s.masks = [os.path.join(d, "gt_masks", split, name, f"{name}_{k + 1}.png")
                   for k in range(s.labels["num_masks"])]
        s.audio = self.wave_ref(os.path.join(d, "wave", split),
                                os.path.join(d, "audio_wav", split), name)


# =============================================================================== MUSIC-AVQA
AVQA_FIELDS = ("video_id", "question_id", "type", "question_content", "templ_values", "anser")


def avqa_question_tokens(entry: dict) -> list[str]:
    """The official MUSIC-AVQA tokenisation: split on spaces, drop the last character (the
    '?'; the official code drops it unconditionally, which also handles the full-width '？'
    of some questions), replace each ``<...>`` placeholder by the next ``templ_values`` entry."""
    words = entry["question_content"].rstrip().split(" ")
    words[-1] = words[-1][:-1]
    values = parse_listish(entry["templ_values"])
    p = 0
    for i, w in enumerate(words):
        if "<" in w:
            if p >= len(values):
                raise ValueError(f"placeholder {w!r} has no templ_values entry (values {values})")
            words[i] = values[p]
            p += 1
    return words


def parse_listish(value) -> list:
    """``type`` and ``templ_values`` are JSON lists stored as strings."""
    if isinstance(value, list):
        return value
    try:
        out = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        out = ast.literal_eval(value)
    if not isinstance(out, list):
        raise ValueError(f"expected a list, got {value!r}")
    return out


def load_avqa_json(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise LayoutError(f"{path}: expected a JSON list of question objects")
    for i, entry in enumerate(data):
        missing = [k for k in AVQA_FIELDS if k not in entry]
        if missing:
            raise LayoutError(f"{path}: entry {i} (question_id {entry.get('question_id')}) lacks "
                              f"field(s) {missing} (the answer key is spelled 'anser')")
    return data


def read_vocab_file(path: str) -> list[str]:
    """One entry per line; repeats dropped (ques_vocab.txt lists its 93 tokens twice)."""
    out: list[str] = []
    seen = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            tok = line.rstrip("\n")
            if tok and tok not in seen:
                seen.add(tok)
                out.append(tok)
    return out


@LAYOUTS.register("avqa")
class AVQALayout(Layout):
    dataset = "avqa"
    clip_seconds = None  # 10 segments spread over the whole (~60 s) video

    def question_json(self, src: str, split: str) -> str:
        for sub in ("json_update", "json"):
            p = os.path.join(src, sub, f"avqa-{split}.json")
            if os.path.isfile(p):
                return p
        raise LayoutError(f"MUSIC-AVQA {split} questions not found: expected "
                          f"{os.path.join(src, 'json_update', f'avqa-{split}.json')}")

    def vocabularies(self, src: str) -> tuple[list[str], list[str]]:
        """(answers, question tokens): the official vocab files if present, else built from
        the train json (the original one first, as the official code does) in order of first
        appearance."""
        ans_file, q_file = os.path.join(src, "ans_vocab.txt"), os.path.join(src, "ques_vocab.txt")
        if os.path.isfile(ans_file) and os.path.isfile(q_file):
            return read_vocab_file(ans_file), read_vocab_file(q_file)
        train = None
        for sub in ("json", "json_update"):
            p = os.path.join(src, sub, "avqa-train.json")
            if os.path.isfile(p):
                train = p
                break
        if train is None:
            raise LayoutError(f"MUSIC-AVQA vocabularies: need {ans_file} and {q_file}, or the "
                              f"train questions {os.path.join(src, 'json', 'avqa-train.json')}")
        answers, tokens = [], ["<pad>"]
        for entry in load_avqa_json(train):
            if entry["anser"] not in answers:
                answers.append(entry["anser"])
            for tok in avqa_question_tokens(entry):
                if tok not in tokens:
                    tokens.append(tok)
        return answers, tokens

    def list_split(self, src, split, from_videos=False, videos_dir=None):
        self.check_split(split)
        path = self.question_json(src, split)
        answers, tokens = self.vocabularies(src)
        known_answers, known_tokens = set(answers), set(tokens)
        samples = []
        for i, entry in enumerate(load_avqa_json(path)):
            vid = str(entry["video_id"])
            key = sanitize_key(f"{vid}_q{entry['question_id']}")
            s = RawSample(key=key, labels={})
            try:
                qtype = parse_listish(entry["type"])
                words = avqa_question_tokens(entry)
            except (ValueError, SyntaxError) as e:
                raise LayoutError(f"{path}: entry {i} (question_id {entry['question_id']}): {e}") \
                    from None
            s.labels = {"video_id": vid, "question_id": entry["question_id"],
                        "question_type": qtype, "question": entry["question_content"],
                        "question_tokens": words, "answer": entry["anser"],
                        "question_deleted": entry.get("question_deleted", 0)}
            if entry["anser"] not in known_answers:
                s.error = SampleError(key, path, f"unknown answer {entry['anser']!r} (not in the "
                                      f"{len(answers)}-answer vocabulary)")
            unknown = [w for w in words if w not in known_tokens]
            if unknown and s.error is None:
                s.error = SampleError(key, path, f"question token(s) {unknown} not in the "
                                      f"{len(tokens)}-token question vocabulary")
            if from_videos:
                s.video = self.video_path(src, videos_dir, vid)
            else:
                s.frames, err = self.frames_from_dir(key, os.path.join(src, "frames", vid),
                                                     self.segments)
                s.error = s.error or err
                s.audio = AudioRef("npy", os.path.join(src, "audio_wave", vid + ".npy"))
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"answers": answers, "question_tokens": tokens,
                                      "question_types": [list(t) for t in vocab.AVQA_QUESTION_TYPES],
                                      "max_question_len": vocab.AVQA_MAX_QUESTION_LEN})


def audio_samples(dataset: str) -> int:
    return SEGMENTS[dataset] * SAMPLE_RATE
