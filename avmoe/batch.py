"""The typed batch every model takes: ``AVBatch`` lives in ``data_pipeline.batch`` (the
bottom layer, which produces it); re-exported here for the model and trainer code."""

from data_pipeline.batch import AVBatch

__all__ = ["AVBatch"]
