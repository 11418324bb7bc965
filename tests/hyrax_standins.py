"""Empty stand-ins for the few packages Hyrax 0.8.3 imports but a cache test never uses.

Hyrax 0.8.3 imports ``torchvision`` (transforms, for image datasets), ``mlflow``
(experiment tracking in the train verb), ``lancedb`` (one dataset class) and
``schwimmbad`` (the HSC downloader) when ``hyrax`` is imported. Only a torch CPU wheel
installs on the test machines, and the other three are large; building Hyrax's
``DataProvider`` over ``HyraxRandomDataset`` calls none of them. ``install()`` makes each
of these names, where it is not installed, an empty module whose attributes are empty
placeholder classes, so ``import hyrax`` succeeds. A test that used any of them would fail
on a placeholder, not pass silently: the placeholders have no behaviour.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["STANDINS", "install"]

STANDINS = ("torchvision", "mlflow", "lancedb", "schwimmbad")


class _Empty(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (), {"__module__": self.__name__})
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
        return _Empty(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install() -> list[str]:
    """Provide an empty module for each name in ``STANDINS`` that is not installed.

    Returns
    -------
    list of str
        The names stood in for.
    """
    missing = {name for name in STANDINS if importlib.util.find_spec(name) is None}
    # schwimmbad installs but imports "multiprocess", which may not: stand in for it too.
    if "schwimmbad" not in missing and importlib.util.find_spec("multiprocess") is None:
        missing.add("schwimmbad")
        sys.modules.pop("schwimmbad", None)
    if missing:
        sys.meta_path.insert(0, _Finder(missing))
    return sorted(missing)
