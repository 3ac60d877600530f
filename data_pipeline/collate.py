"""Labels json -> the fixed-shape target arrays of ``avmoe.batch.AVBatch``, and numpy columns
-> ``AVBatch``.

Every shape is known from the manifest before any sample is read (``SampleSpec``), so a decode
task preallocates its output, a bad sample's row is zero-filled without guessing (rows stay
aligned with the plan; the consumer drops them), and a sample that does not fit the schema (a
frame of another size, a question longer than ``max_question_len``) is an error naming the
sample and the field rather than a silently padded or truncated target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from data_pipeline.schema import SAMPLE_RATE
from data_pipeline.vocab import AVQA_QUESTION_TYPES

# Column names of the decoded blocks (targets are "t_<name>").
KEY, OK, ERROR, ERR_SHARD, ERR_MEMBER = "key", "ok", "error", "err_shard", "err_member"
FRAMES, AUDIO, TARGET_PREFIX = "frames", "audio", "t_"


class LabelError(ValueError):
    """A labels json field is missing or does not fit the manifest's vocabulary / shapes."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"labels field {field!r}: {problem}")


@dataclass(frozen=True)
class SampleSpec:
    """Static per-sample shapes and vocabularies of one split (from its manifest)."""

    dataset: str
    split: str
    segments: int
    frame_size: int
    mask_size: int
    audio_format: str
    num_classes: int = 0  # avvp
    with_events: bool = False  # avvp val/test: gt_audio / gt_visual
    question_tokens: tuple[str, ...] = ()  # avqa
    answers: tuple[str, ...] = ()
    max_question_len: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SampleSpec":
        opts, vocab, ds = manifest["options"], manifest.get("label_vocab", {}), manifest["dataset"]
        kw: dict = dict(dataset=ds, split=manifest["split"], segments=int(manifest["segments"]),
                        frame_size=int(opts["frame_size"]), mask_size=int(opts["mask_size"]),
                        audio_format=opts.get("audio_format", "npy"))
        if ds == "avvp":
            kw.update(num_classes=len(vocab["classes"]), with_events=manifest["split"] != "train")
        if ds == "avqa":
            kw.update(question_tokens=tuple(vocab["question_tokens"]),
                      answers=tuple(vocab["answers"]),
                      max_question_len=int(vocab["max_question_len"]))
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def audio_len(self) -> int:
        return self.segments * SAMPLE_RATE

    def target_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (per-sample shape, dtype) of every target of this split."""
        t = self.segments
        if self.dataset == "ave":
            return {"segment_labels": ((t,), np.dtype(np.int64))}
        if self.dataset == "avvp":
            out = {"video_labels": ((self.num_classes,), np.dtype(np.float32)),
                   "features": ((t, 512), np.dtype(np.float32))}
            if self.with_events:
                out["gt_audio"] = ((self.num_classes, t), np.dtype(np.uint8))
                out["gt_visual"] = ((self.num_classes, t), np.dtype(np.uint8))
            return out
        if self.dataset.startswith("avs"):
            return {"masks": ((t, self.mask_size, self.mask_size), np.dtype(np.uint8)),
                    "mask_valid": ((t,), np.dtype(np.bool_))}
        if self.dataset == "avqa":
            return {"question_ids": ((self.max_question_len,), np.dtype(np.int64)),
                    "answer": ((), np.dtype(np.int64)),
                    "question_type": ((), np.dtype(np.int64))}
        raise ValueError(f"unknown dataset {self.dataset!r}")


class TargetEncoder:
    """Fills one sample's target rows from its labels json (vocab lookups built once)."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec
        self._tok = {w: i for i, w in enumerate(spec.question_tokens)}
        self._ans = {a: i for i, a in enumerate(spec.answers)}
        self._qtype = {tuple(q): i for i, q in enumerate(AVQA_QUESTION_TYPES)}

    def fill(self, labels: dict, out: dict[str, np.ndarray], i: int) -> None:
        """Write the label-derived targets of row ``i`` (``features`` and ``masks`` come from
        their own members and are written by the decoder)."""
        s, t = self.spec, self.spec.segments
        ds = s.dataset
        if ds == "ave":
            seg = _field(labels, "segment_labels")
            if len(seg) != t or not all(0 <= int(x) <= 28 for x in seg):
                raise LabelError("segment_labels", f"expected {t} ints in 0..28, got {seg!r}")
            out["segment_labels"][i] = seg
        elif ds == "avvp":
            idx = _field(labels, "label_indices")
            row = out["video_labels"][i]
            row[:] = 0
            for c in idx:
                if not 0 <= int(c) < s.num_classes:
                    raise LabelError("label_indices", f"class {c} outside 0..{s.num_classes - 1}")
                row[int(c)] = 1.0
            if s.with_events:
                for name, fld in (("gt_audio", "audio_events"), ("gt_visual", "visual_events")):
                    gt = out[name][i]
                    gt[:] = 0
                    for ev in _field(labels, fld):
                        c, on, off = (int(v) for v in ev)
                        if not 0 <= c < s.num_classes:
                            raise LabelError(fld, f"class {c} outside 0..{s.num_classes - 1}")
                        # offsets are exclusive, as the official eval loops range(on, off)
                        gt[c, max(0, on):max(0, min(off, t))] = 1
        elif ds.startswith("avs"):
            n = int(_field(labels, "num_masks"))
            if not 1 <= n <= t:
                raise LabelError("num_masks", f"expected 1..{t}, got {n}")
            out["mask_valid"][i] = np.arange(t) < n
        elif ds == "avqa":
            toks = _field(labels, "question_tokens")
            if len(toks) > s.max_question_len:
                raise LabelError("question_tokens", f"{len(toks)} tokens, more than the "
                                 f"manifest's max_question_len {s.max_question_len}")
            ids = out["question_ids"][i]
            ids[:] = 0  # index 0 = <pad>
            for j, w in enumerate(toks):
                if w not in self._tok:
                    raise LabelError("question_tokens", f"token {w!r} is not in the manifest's "
                                     f"{len(self._tok)}-token vocabulary")
                ids[j] = self._tok[w]
            ans = _field(labels, "answer")
            if ans not in self._ans:
                raise LabelError("answer", f"{ans!r} is not one of the {len(self._ans)} answers")
            out["answer"][i] = self._ans[ans]
            qt = tuple(_field(labels, "question_type"))
            if qt not in self._qtype:
                raise LabelError("question_type", f"{list(qt)!r} is not one of "
                                 "AVQA_QUESTION_TYPES")
            out["question_type"][i] = self._qtype[qt]


def _field(labels: dict, name: str):
    try:
        return labels[name]
    except KeyError:
        raise LabelError(name, "missing") from None


def empty_columns(spec: SampleSpec, n: int) -> dict[str, np.ndarray]:
    """Zero-filled output columns for ``n`` samples (the decode task's preallocation)."""
    s = spec.frame_size
    cols = {FRAMES: np.zeros((n, spec.segments, s, s, 3), np.uint8),
            AUDIO: np.zeros((n, spec.audio_len), np.int16),
            OK: np.zeros(n, np.bool_)}
    for name, (shape, dtype) in spec.target_shapes().items():
        cols[TARGET_PREFIX + name] = np.zeros((n, *shape), dtype)
    return cols


def to_avbatch(cols: dict[str, np.ndarray], keep: np.ndarray | None, meta: dict):
    """numpy columns (one plan batch) -> ``AVBatch`` with only the rows in ``keep``.

    Arrays that arrive read-only (zero-copy views of Ray's shared-memory object store) are
    copied: a tensor aliasing the object store must never be written to, and the model or
    trainer may use the batch in place. Writable arrays are wrapped without a copy."""
    import torch

    from avmoe.batch import AVBatch

    def tensor(a: np.ndarray) -> torch.Tensor:
        if keep is not None:
            a = a[keep]  # fancy indexing copies: writable
        if not a.flags.writeable:
            a = a.copy(order="C")  # one copy, contiguous and writable
        elif not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        return torch.from_numpy(a)

    keys = [str(k) for k in (cols[KEY] if keep is None else cols[KEY][keep])]
    targets = {name[len(TARGET_PREFIX):]: tensor(v) for name, v in cols.items()
               if name.startswith(TARGET_PREFIX)}
    return AVBatch(frames=tensor(cols[FRAMES]), audio=tensor(cols[AUDIO]), targets=targets,
                   keys=keys, meta=meta)
