"""MUSIC-AVQA (audio-visual question answering): ~60-s music videos, one sample per question
(key ``<video_id>_q<question_id>``), 10 segments spread over the whole video.

Raw layout: ``json_update/avqa-{split}.json`` (else ``json/``); vocabularies from
``ans_vocab.txt`` + ``ques_vocab.txt``, else built from ``json/avqa-train.json``;
``frames/<vid>/%08d.jpg`` + ``audio_wave/<vid>.npy``, or ``videos/<vid>.mp4``.

Targets: ``question_ids`` (max_question_len,) int64 (0 = ``<pad>``); ``answer`` () int64 into
the manifest's answers; ``question_type`` () int64 into ``QUESTION_TYPES``.
"""

from __future__ import annotations

import ast
import json
import os

import numpy as np

from data_pipeline.datasets.base import (Dataset, RawSample, SplitListing, read_text, register,
                                         unique_keys)
from data_pipeline.errors import LayoutError, SampleError
from data_pipeline.sample import LabelError, label_field
from data_pipeline.schema import sanitize_key
from data_pipeline.synthetic import render_clip, save_clip, segment_audio, split_sizes

# MUSIC-AVQA question types (type, subtype), the groups of the official breakdown.
QUESTION_TYPES = [
    ("Audio", "Counting"), ("Audio", "Comparative"),
    ("Visual", "Counting"), ("Visual", "Location"),
    ("Audio-Visual", "Existential"), ("Audio-Visual", "Counting"),
    ("Audio-Visual", "Location"), ("Audio-Visual", "Comparative"),
    ("Audio-Visual", "Temporal"),
]
SEGMENTS = 10
MAX_QUESTION_LEN = 14

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
        data = json.loads(read_text(path, "MUSIC-AVQA questions json"))
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise LayoutError(f"{path}: expected a JSON list of question objects")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise LayoutError(f"{path}: entry {i} is a {type(entry).__name__}, expected a "
                              "question object")
        missing = [k for k in AVQA_FIELDS if k not in entry]
        if missing:
            raise LayoutError(f"{path}: entry {i} (question_id {entry.get('question_id')}) lacks "
                              f"field(s) {missing} (the answer key is spelled 'anser')")
    return data


def read_vocab_file(path: str) -> list[str]:
    """One entry per line; repeats dropped (ques_vocab.txt lists its 93 tokens twice)."""
    out: list[str] = []
    seen = set()
    for tok in read_text(path, "vocabulary file").splitlines():
        if tok and tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


# ------------------------------------------------------------------------------ synthetic data
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


@register
class AVQA(Dataset):
    name = task = "avqa"
    segments, demo_size, synth_max_classes = SEGMENTS, 24, len(INSTRUMENTS)
    clip_seconds = None  # 10 segments spread over the whole (~60 s) video
    inspect_omit = ("question",)

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
            self.frames_and_wave(s, src, vid, os.path.join(src, "frames", vid),
                                 os.path.join(src, "audio_wave", vid + ".npy"), from_videos,
                                 videos_dir)
            samples.append(s)
        unique_keys(samples, path)
        return SplitListing(samples, {"answers": answers, "question_tokens": tokens,
                                      "question_types": [list(t) for t in QUESTION_TYPES],
                                      "max_question_len": MAX_QUESTION_LEN})

    # ------------------------------------------------------------------ targets
    def spec_extra(self, manifest):
        vocab = manifest["label_vocab"]
        return {"question_tokens": list(vocab["question_tokens"]),
                "answers": list(vocab["answers"]),
                "max_question_len": int(vocab["max_question_len"])}

    def target_shapes(self, spec):
        return {"question_ids": ((spec.extra["max_question_len"],), np.dtype(np.int64)),
                "answer": ((), np.dtype(np.int64)),
                "question_type": ((), np.dtype(np.int64))}

    def target_encoder(self, spec):
        max_len = spec.extra["max_question_len"]
        tok = {w: i for i, w in enumerate(spec.extra["question_tokens"])}
        ans = {a: i for i, a in enumerate(spec.extra["answers"])}
        qtypes = {tuple(q): i for i, q in enumerate(QUESTION_TYPES)}

        def fill(labels: dict, out: dict, i: int) -> None:
            toks = label_field(labels, "question_tokens")
            if len(toks) > max_len:
                raise LabelError("question_tokens", f"{len(toks)} tokens, more than the "
                                 f"manifest's max_question_len {max_len}")
            ids = out["question_ids"][i]
            ids[:] = 0  # index 0 = <pad>
            for j, w in enumerate(toks):
                if w not in tok:
                    raise LabelError("question_tokens", f"token {w!r} is not in the manifest's "
                                     f"{len(tok)}-token vocabulary")
                ids[j] = tok[w]
            answer = label_field(labels, "answer")
            if answer not in ans:
                raise LabelError("answer", f"{answer!r} is not one of the {len(ans)} answers")
            out["answer"][i] = ans[answer]
            qt = tuple(label_field(labels, "question_type"))
            if qt not in qtypes:
                raise LabelError("question_type", f"{list(qt)!r} is not one of "
                                 "AVQA_QUESTION_TYPES")
            out["question_type"][i] = qtypes[qt]

        return fill

    # ------------------------------------------------------------------ inference
    def inference_sample(self, spec, question=None, question_type=None, **inputs):
        """``question``: the text, tokenised as the official code does (space-separated words,
        the final '?' dropped); every word must be in the trained question vocabulary.
        ``question_type``: "Type/Subtype" (e.g. "Audio-Visual/Existential", the breakdown the
        answer is reported under; MUSIC-AVQA's annotations give it, free text does not), default
        the first one."""
        if not question or not question.strip():
            raise ValueError("AVQA needs a question (--question \"Is the guitar playing?\")")
        words = avqa_question_tokens({"question_content": question.strip(), "templ_values": "[]"})
        vocab = set(spec.extra["question_tokens"])
        unknown = [w for w in words if w not in vocab]
        if unknown:
            raise ValueError(f"question word(s) {unknown} are not in the model's {len(vocab)}-word question "
                             f"vocabulary (MUSIC-AVQA's questions are templated: rephrase with known words)")
        if len(words) > spec.extra["max_question_len"]:
            raise ValueError(f"the question has {len(words)} words; the model takes at most "
                             f"{spec.extra['max_question_len']}")
        qtype = list(QUESTION_TYPES[0])
        if question_type:
            qtype = [x.strip() for x in question_type.split("/")]
            if tuple(qtype) not in QUESTION_TYPES:
                raise ValueError(f"question type {question_type!r} is not one of "
                                 f"{', '.join('/'.join(t) for t in QUESTION_TYPES)}")
        labels = {"question": question, "question_tokens": words, "question_type": qtype,
                  "answer": spec.extra["answers"][0]}  # (the answer is what is asked: a placeholder)
        return labels, []

    # ------------------------------------------------------------------ synthetic data
    def synth(self, out, n, rng, num_classes, size, videos):
        qid = 0
        for split, count in split_sizes(n).items():
            entries = []
            for i in range(count):
                vid = f"{int(rng.integers(0, 10**8)):08d}"
                k = 1 + i % 2
                objects = [(int(c), slot) for slot, c in
                           enumerate(rng.choice(min(num_classes, len(INSTRUMENTS)), k,
                                                replace=False))]
                audible = sorted(int(j) for j in rng.choice(k, 1 + int(rng.integers(0, k)),
                                                            replace=False))
                n_files = 20  # a "long" video: the packer samples 10 frames uniformly
                frames = render_clip(rng, size, n_files, SEGMENTS,
                                     lambda t: [(c, num_classes, slot) for c, slot in objects],
                                     official_sampling=not videos)
                wave = segment_audio(rng, SEGMENTS,
                                     [[(objects[j][0], num_classes) for j in audible]] * SEGMENTS)
                save_clip(frames, wave, videos, os.path.join(out, "videos", vid + ".mp4"),
                          os.path.join(out, "frames", vid),
                          os.path.join(out, "audio_wave", vid + ".npy"), 2)
                for qtype, text, values, answer in avqa_questions(rng, objects, audible):
                    if answer is None:  # the location question: is the stated side right?
                        target = [INSTRUMENTS[c % len(INSTRUMENTS)]
                                  for c, _ in objects].index(values[0])
                        answer = "yes" if ("left" if objects[target][1] == 0 else "right") \
                            == values[1] else "no"
                    qid += 1
                    entries.append({"video_id": vid, "question_id": qid,
                                    "type": json.dumps(qtype), "question_content": text,
                                    "templ_values": json.dumps(values), "question_deleted": 0,
                                    "anser": answer})
            for sub in ("json_update",) + (("json",) if split == "train" else ()):
                os.makedirs(os.path.join(out, sub), exist_ok=True)
                with open(os.path.join(out, sub, f"avqa-{split}.json"), "w") as f:
                    json.dump(entries, f, indent=1)
