"""The generic name -> object ``Registry`` lives in ``data_pipeline.registry`` (the bottom
layer); avmoe's registries (backbones, adapters, heads, tasks) use it from here."""

from data_pipeline.registry import Registry

__all__ = ["Registry"]
