"""Stand-ins for the packages Hyrax 0.13 imports that a cache test never uses.

Hyrax 0.13 imports, when ``hyrax`` and its train verb are imported, many large packages:
torchvision (image transforms), mlflow (experiment tracking in the train verb), astropy,
lancedb/lance, chromadb, qdrant, onnx, umap, plotting and streaming libraries. On the test
machines torchvision from the registry does not load against the CPU torch, and the
others are gigabytes. Training ``HyraxLoopback`` on ``HyraxRandomDataset`` calls none of
them except mlflow's run bookkeeping and astropy's ``Table`` for the random dataset's
metadata.

``install()`` makes torchvision, and each of the others that is not installed, a module whose every
attribute is ``Inert``: a class that accepts any arguments, returns an ``Inert`` from any
call or attribute, and is a context manager. So ``mlflow.start_run(...)`` is a no-op
block, and ``astropy.table.Table(meta)`` an object nothing reads here. A test that needed
real behaviour from any of them would get an ``Inert`` where it expects data and fail.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["STANDINS", "Inert", "install"]

STANDINS = (
    "torchvision",
    "mlflow",
    "astropy",
    "fitsio",
    "lancedb",
    "lance",
    "lance_namespace",
    "chromadb",
    "qdrant_client",
    "schwimmbad",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "nested_pandas",
    "lsdb",
    "hats",
    "upath",
    "confluent_kafka",
    "datasets",
    "umap",
    "sklearn",
    "holoviews",
    "bokeh",
    "datashader",
    "plotly",
    "pooch",
    "tensorboard",
)


class Inert:
    """Accepts any construction, call, attribute and ``with``; does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Inert()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (Inert,), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, tops: set[str]):
        self.tops = tops

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in self.tops:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install() -> list[str]:
    """Provide an inert module for torchvision, and for each other name not installed.

    Returns
    -------
    list of str
        The names stood in for.
    """
    missing = {name for name in STANDINS if importlib.util.find_spec(name) is None}
    # torchvision from the registry may install but fail to load against a CPU torch.
    missing.add("torchvision")
    for name in list(sys.modules):
        if name.split(".")[0] == "torchvision":
            del sys.modules[name]
    if missing:
        sys.meta_path.insert(0, _Finder(missing))
    return sorted(missing)
