"""data_pipeline: pack raw audio-visual datasets into WebDataset shards and read them back.

Verbs (``python -m data_pipeline --help``): synth, pack, verify, inspect.
"""

from data_pipeline.schema import SCHEMA_VERSION  # noqa: F401
