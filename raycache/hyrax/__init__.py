"""raycache for Hyrax: the cache class that fits the installed Hyrax, and ``install()``.

Hyrax's ``DataProvider`` imports its cache class inside its constructor
(``from hyrax.datasets.data_cache import DataCache``), so replacing that module attribute
before the providers are built makes Hyrax use raycache. ``install()`` does that with the
class written for the installed Hyrax version (``raycache.hyrax.versions``): Hyrax 0.8.x
gets ``raycache.DataCache``, Hyrax 0.9-0.13 ``raycache.hyrax.cache_v09.DataCache``; any
other version is refused with the supported ones named. Hyrax is imported only when
``install()`` or ``cache_class()`` is called: it is an optional dependency.

A process Hyrax forks (DataLoader workers) inherits the swap. A process Hyrax spawns
(DDP ranks under ``general.distributed``) re-imports the user's script as
``__mp_main__``, so ``install()`` must run at the script's top level, not under
``if __name__ == "__main__":``; the providers such a rank unpickles carry raycache's
class with them either way.
"""

from __future__ import annotations

import importlib
from typing import Any

from raycache.hyrax.versions import SUPPORTED, UnsupportedHyraxError, class_path_for, describe

__all__ = [
    "SUPPORTED",
    "DataCache",
    "UnsupportedHyraxError",
    "cache_class",
    "hyrax_version",
    "install",
    "supported_versions",
]


def hyrax_version() -> str:
    """Return the installed Hyrax's version.

    Returns
    -------
    str
        ``hyrax.__version__``.

    Raises
    ------
    UnsupportedHyraxError
        If Hyrax cannot be imported.
    """
    try:
        hyrax = importlib.import_module("hyrax")
    except ImportError as exc:
        raise UnsupportedHyraxError(
            f"Hyrax cannot be imported ({exc}); raycache.hyrax serves {describe()}"
        ) from exc
    return str(getattr(hyrax, "__version__", "unknown"))


def supported_versions() -> str:
    """Return the Hyrax versions raycache serves, in words.

    Returns
    -------
    str
        For example ``"Hyrax 0.8.x and 0.9-0.13"``.
    """
    return describe()


def cache_class(version: str | None = None) -> type:
    """Return the raycache class that speaks the cache API of a Hyrax version.

    Parameters
    ----------
    version : str, optional
        A Hyrax version; default the installed one.

    Returns
    -------
    type
        ``raycache.DataCache`` (0.8.x) or ``raycache.hyrax.cache_v09.DataCache`` (0.9-0.13).

    Raises
    ------
    UnsupportedHyraxError
        For any other version, naming the supported ones.
    """
    module, _, name = class_path_for(version or hyrax_version()).partition(":")
    return getattr(importlib.import_module(module), name)


def install() -> type:
    """Make Hyrax build raycache's cache in this process and the processes it starts.

    Call it at the top level of the training script or notebook, before Hyrax builds its
    data providers::

        import raycache.hyrax; raycache.hyrax.install()

    Returns
    -------
    type
        The class now at ``hyrax.datasets.data_cache.DataCache``.

    Raises
    ------
    UnsupportedHyraxError
        If Hyrax cannot be imported or its version is not supported.
    """
    cls = cache_class()
    hyrax_cache = importlib.import_module("hyrax.datasets.data_cache")
    hyrax_cache.DataCache = cls
    return cls


def __getattr__(name: str) -> Any:
    # The 0.9+ class is imported on first use: importing raycache.hyrax must stay cheap.
    if name == "DataCache":
        from raycache.hyrax.cache_v09 import DataCache

        return DataCache
    raise AttributeError(f"module 'raycache.hyrax' has no attribute {name!r}")
