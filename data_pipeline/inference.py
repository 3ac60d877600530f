"""A user's video as a one-sample batch, through the packer's and the ingest's own code paths.

``sample_from_video(video, manifest)`` decodes the video as ``pack --from-videos`` does (PyAV,
one frame per segment resized to the shards' ``frame_size`` and JPEG-encoded at their quality,
32 kHz mono audio checked and stored as the shards store it), lays the sample out as a shard
does (the dataset's ``inference_sample`` supplies labels without ground truth and any extra
member), then decodes it with the streaming ingest's ``SampleDecoder``: the model sees exactly
what it would see had the video been packed into its test split. No train/serve skew by
construction; ``tests/test_predict.py`` checks it against a packed copy.
"""

from __future__ import annotations

import io

import numpy as np

from data_pipeline.batch import AVBatch
from data_pipeline.datasets import Dataset, get_dataset
from data_pipeline.decode_task import SampleDecoder
from data_pipeline.pack import PackOptions, video_sample_members
from data_pipeline.sample import KEY, SampleSpec, empty_columns, to_avbatch
from data_pipeline.schema import sanitize_key
from data_pipeline.tario import DeterministicTarWriter


def pack_options(manifest: dict) -> PackOptions:
    """The options a split was packed with (what a new sample must be encoded with)."""
    o = manifest["options"]
    return PackOptions(frame_size=int(o["frame_size"]), mask_size=int(o["mask_size"]),
                       jpeg_quality=int(o.get("jpeg_quality", 90)), audio_format=o.get("audio_format", "npy"))


def sample_from_video(video: str, manifest: dict, dataset: Dataset | None = None, key: str | None = None,
                      **inputs) -> AVBatch:
    """One-sample ``AVBatch`` of ``video`` for a model trained on the shards of ``manifest``;
    ``inputs`` go to the dataset's ``inference_sample`` (AVQA ``question``, AVVP ``features``).
    Raises ``SampleError`` (unreadable video, no audio track, too short) or ``ValueError``."""
    ds = dataset or get_dataset(manifest["dataset"])
    spec = SampleSpec.from_manifest(manifest, ds)
    key = key or sanitize_key(video.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]) or "video"
    labels, extra = ds.inference_sample(spec, **inputs)
    members = video_sample_members(video, key, ds, pack_options(manifest), labels, extra)
    buf = io.BytesIO()
    offset, length, _ = DeterministicTarWriter(buf).add_sample(key, members)
    cols = empty_columns(spec, 1, ds)
    SampleDecoder(spec, ds).decode_into(memoryview(buf.getvalue())[offset:offset + length], key, cols, 0)
    cols[KEY] = np.array([key], dtype=object)
    return to_avbatch(cols, None, {})
