"""The datasets: one module per dataset in this package (``ave``, ``avvp``, ``avs`` (S4 and
MS3), ``avqa``), each registering a ``Dataset`` (``base.py``) in ``DATASETS``.

Importing the package imports every module in it, then the ``data_pipeline.datasets`` entry
points of installed distributions (a plug-in's entry point names a ``Dataset`` subclass or
instance, or a module that registers its own), so a new dataset is one new file here or one
entry point; nothing else names datasets.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

from data_pipeline.datasets.base import DATASETS, Dataset, register
from data_pipeline.errors import UnknownDatasetError

__all__ = ["DATASETS", "Dataset", "as_dataset", "get_dataset", "list_datasets", "register"]

log = logging.getLogger("data_pipeline.datasets")


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name``; ``UnknownDatasetError`` (a ``KeyError`` and a
    ``DataPipelineError``) lists the known names."""
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; expected one of "
                                  f"{', '.join(list_datasets())}")
    obj = DATASETS.get(name)
    return obj() if isinstance(obj, type) else obj  # a registered class: a fresh instance


def as_dataset(dataset: str | Dataset) -> Dataset:
    """A ``Dataset`` given one or its registered name."""
    return dataset if isinstance(dataset, Dataset) else get_dataset(dataset)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    for ep in entry_points(group="data_pipeline.datasets"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plug-in must not take the built-in datasets down
            log.warning("dataset plug-in %s (%s) does not load: %s", ep.name, ep.value, e)
            continue
        if isinstance(obj, type) and issubclass(obj, Dataset):
            obj = obj()
        if isinstance(obj, Dataset) and (obj.name or ep.name) not in DATASETS:
            DATASETS.add(obj.name or ep.name, obj)  # the name its manifests will carry


_discover()
