"""The fixed-shape form of decoded samples: ``SampleSpec`` (the static shapes and
vocabularies of one split, from its manifest), the columns of a decoded block, ``LabelError`` and the
member helpers the decoders use, and numpy columns -> ``AVBatch``.

Every shape is known from the manifest before any sample is read, so a decode task
preallocates its output, a bad sample's row is zero-filled without guessing (rows stay
aligned with the plan; the consumer drops them), and a sample that does not fit the schema (a
frame of another size, a question longer than ``max_question_len``) is an error naming the
sample and the field rather than a silently padded or truncated target. Which targets a split
has, and how its labels json fills them, is the dataset's (``Dataset.target_shapes``,
``Dataset.target_encoder``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.decode import decode_npy
from data_pipeline.errors import MemberError
from data_pipeline.schema import SAMPLE_RATE

if TYPE_CHECKING:
    from data_pipeline.datasets.base import Dataset

# Column names of the decoded blocks (targets are "t_<name>").
KEY, OK, ERROR, ERR_SHARD, ERR_MEMBER = "key", "ok", "error", "err_shard", "err_member"
FRAMES, AUDIO, TARGET_PREFIX = "frames", "audio", "t_"
# Blocks whose JPEG frames the consumer decodes (``IngestConfig.decode_on`` "trainer" / "gpu")
# carry, instead of FRAMES: each sample's frame members concatenated (one ``bytes`` object per
# row), the (segments + 1) offsets of its frames in it, and whether the row reached the frame
# stage in the decode task (its frames are still to be decoded and checked).
JPEG, JPEG_OFFSETS, FRAMES_PENDING = "frames_jpeg", "frames_jpeg_offsets", "frames_pending"


class LabelError(ValueError):
    """A labels json field is missing or does not fit the manifest's vocabulary / shapes."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"labels field {field!r}: {problem}")


def label_field(labels: dict, name: str):
    """``labels[name]``, or a ``LabelError`` saying it is missing."""
    try:
        return labels[name]
    except KeyError:
        raise LabelError(name, "missing") from None


def npy_member(data, name: str) -> np.ndarray:
    """A ``.npy`` member (no pickle), or a ``MemberError`` naming it."""
    try:
        return decode_npy(data)
    except Exception as e:
        raise MemberError(name, f"does not load as .npy ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class SampleSpec:
    """Static per-sample shapes and vocabularies of one split (from its manifest).

    ``extra`` holds the dataset's own JSON-able fields (``Dataset.spec_extra``: e.g. AVVP's
    ``num_classes`` / ``with_events``, MUSIC-AVQA's vocabularies); ``to_dict()`` round-trips
    through JSON (``SampleSpec(**d)``)."""

    dataset: str
    split: str
    segments: int
    frame_size: int
    mask_size: int
    audio_format: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: dict, dataset: "Dataset | None" = None) -> "SampleSpec":
        """The spec of a split; ``dataset`` defaults to the manifest's (looked up by name:
        pass the object where the registry may not hold it, e.g. in a worker)."""
        if dataset is None:
            from data_pipeline.datasets import get_dataset

            dataset = get_dataset(manifest["dataset"])
        opts = manifest["options"]
        try:
            extra = dataset.spec_extra(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            from data_pipeline.errors import ManifestError

            raise ManifestError(f"{manifest['dataset']} {manifest['split']} manifest: "
                                f"'label_vocab' does not hold what the {manifest['dataset']} "
                                f"dataset needs ({type(e).__name__}: {e})",
                                field="label_vocab") from None
        return cls(dataset=manifest["dataset"], split=manifest["split"],
                   segments=int(manifest["segments"]), frame_size=int(opts["frame_size"]),
                   mask_size=int(opts["mask_size"]), audio_format=opts.get("audio_format", "npy"),
                   extra=extra)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def audio_len(self) -> int:
        return self.segments * SAMPLE_RATE


def empty_columns(spec: SampleSpec, n: int, dataset: "Dataset | None" = None,
                  frames: bool = True) -> dict[str, np.ndarray]:
    """Zero-filled output columns for ``n`` samples (the decode task's preallocation);
    ``dataset`` as in ``SampleSpec.from_manifest``. ``frames=False``: the JPEG frames are
    shipped undecoded (``JPEG_OFFSETS`` and ``FRAMES_PENDING`` instead of ``FRAMES``; the
    ``JPEG`` bytes column is the decode task's)."""
    if dataset is None:
        from data_pipeline.datasets import get_dataset

        dataset = get_dataset(spec.dataset)
    s = spec.frame_size
    if frames:
        cols = {FRAMES: np.zeros((n, spec.segments, s, s, 3), np.uint8)}
    else:
        cols = {JPEG_OFFSETS: np.zeros((n, spec.segments + 1), np.int64),
                FRAMES_PENDING: np.zeros(n, np.bool_)}
    cols.update({AUDIO: np.zeros((n, spec.audio_len), np.int16), OK: np.zeros(n, np.bool_)})
    for name, (shape, dtype) in dataset.target_shapes(spec).items():
        cols[TARGET_PREFIX + name] = np.zeros((n, *shape), dtype)
    return cols


def to_avbatch(cols: dict[str, np.ndarray], keep: np.ndarray | None, meta: dict):
    """numpy columns (one plan batch) -> ``AVBatch`` with only the rows in ``keep``.

    Arrays that arrive read-only (zero-copy views of Ray's shared-memory object store) are
    copied: a tensor aliasing the object store must never be written to, and the model or
    trainer may use the batch in place. Writable arrays are wrapped without a copy."""
    import torch

    from data_pipeline.batch import AVBatch

    def tensor(a) -> torch.Tensor:
        if isinstance(a, torch.Tensor):  # frames decoded on the GPU (decode_on="gpu")
            return a if keep is None else a[torch.from_numpy(np.asarray(keep)).to(a.device)]
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
