"""Every row of the real annotation files parses (../shared/real-annotations)."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from data_pipeline.datasets import get_dataset
from data_pipeline.datasets import ave as ave_ds, avqa as avqa_ds, avvp as avvp_ds
from data_pipeline.datasets.ave import parse_ave_rows
from data_pipeline.datasets.avqa import avqa_question_tokens, load_avqa_json
from data_pipeline.datasets.avvp import parse_avvp_events
from tests.conftest import REAL_ANNOTATIONS

pytestmark = pytest.mark.skipif(not REAL_ANNOTATIONS.exists(),
                                reason="../shared/real-annotations is not beside the repo")


def test_ave_every_row():
    ave = REAL_ANNOTATIONS / "AVE"
    assert [l.rstrip("\n") for l in open(ave / "categories.txt")] == ave_ds.CATEGORIES
    counts = {f: len(parse_ave_rows(str(ave / f))) for f in
              ("Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt")}
    assert counts == {"Annotations.txt": 4143, "trainSet.txt": 3339, "valSet.txt": 402,
                      "testSet.txt": 402}
    layout = get_dataset("ave")
    for split, n in (("train", 3339), ("val", 402), ("test", 402)):
        listing = layout.list_split(str(ave), split)
        assert len(listing.samples) == n == len({s.key for s in listing.samples})
        # no media here: every sample's only problem is its missing frames
        assert all(s.error is not None and "missing frames" in s.error.problem
                   for s in listing.samples)
        for s in listing.samples:
            seg = s.labels["segment_labels"]
            st, en = s.labels["start"], s.labels["end"]
            assert seg == [s.labels["class_index"] if st <= t < en else 28 for t in range(10)]
    # a video listed twice (once per category) gets two keys
    val_keys = [s.key for s in layout.list_split(str(ave), "val").samples]
    assert "3tsi7DKGrWQ" in val_keys and "3tsi7DKGrWQ__2" in val_keys


def test_avvp_every_row():
    avvp = REAL_ANNOTATIONS / "AVVP"
    layout = get_dataset("avvp")
    sizes = {}
    for split in ("train", "val", "test"):
        listing = layout.list_split(str(avvp), split)
        sizes[split] = len(listing.samples)
        assert all(s.error is None for s in listing.samples)  # labels all known
        assert len({s.key for s in listing.samples}) == sizes[split]
    assert sizes == {"train": 10000, "val": 649, "test": 1200}
    for name, rows in (("AVVP_eval_audio.csv", 4131), ("AVVP_eval_visual.csv", 2495)):
        events = parse_avvp_events(str(avvp / name))
        assert sum(len(v) for v in events.values()) == rows
        assert {lab for evs in events.values() for lab, *_ in evs} <= set(avvp_ds.CATEGORIES)
    # keys are tar-safe even for filenames with dots (e.g. AP0061o0Nvk_101.8_111.8)
    train = layout.list_split(str(avvp), "train").samples
    dotted = [s for s in train if "." in s.labels["video_id"]]
    assert dotted and all("." not in s.key for s in dotted)


@pytest.mark.parametrize("sub", ["json_update", "json"])
def test_avqa_every_row(sub, tmp_path):
    src = REAL_ANNOTATIONS / "AVQA"
    expected = {("json_update", "val"): 4568, ("json_update", "test"): 9129,
                ("json", "val"): 4595, ("json", "test"): 9185}
    answers = [l.strip() for l in open(src / "ans_vocab.txt") if l.strip()]
    tokens = set(l.strip() for l in open(src / "ques_vocab.txt") if l.strip())
    for split in ("val", "test"):
        entries = load_avqa_json(str(src / sub / f"avqa-{split}.json"))
        assert len(entries) == expected[(sub, split)]
        for e in entries:
            words = avqa_question_tokens(e)
            assert set(words) <= tokens, (e["question_id"], words)
            assert e["anser"] in answers
    layout = get_dataset("avqa")
    listing = layout.list_split(str(src), "test")  # json_update is preferred
    assert len(listing.samples) == 9129
    assert listing.label_vocab["answers"] == answers and len(listing.label_vocab["question_tokens"]) == 93
    types = Counter(tuple(s.labels["question_type"]) for s in listing.samples)
    assert types[("Audio-Visual", "Counting")] == 1265 and types[("Audio", "Comparative")] == 594
    assert set(types) == set(avqa_ds.QUESTION_TYPES)
