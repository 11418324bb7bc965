"""Hyrax's tomlkit values as plain Python: the cache's config tables and the items.

Hyrax 0.9+ keeps its config as a tomlkit document, whose strings, integers and tables
are tomlkit subclasses of ``str``, ``int`` and ``dict``. Those pass ``isinstance``
checks but not everything downstream: Ray's ``ray.init(address=...)`` refuses a
tomlkit ``String``, and an item whose field names are tomlkit strings (Hyrax takes them
from the config's ``fields`` list) cannot be unpickled by the cache's actor, which does
not import tomlkit. Only the two tables raycache reads, and the items, are converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["cache_tables", "plain_item"]

_TABLES = ("data_set", "raycache")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic | np.ndarray):
        return value
    # bool before int: bool is an int subclass, and tomlkit's Bool is not a bool.
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if type(value).__name__ == "Bool" and hasattr(value, "value"):
        return bool(value.value)
    return value


def cache_tables(config: Any) -> Any:
    """Return the ``data_set`` and ``raycache`` tables of a config as plain Python.

    Parameters
    ----------
    config : Any
        A Hyrax config (a mapping, possibly a tomlkit document), or anything else
        ``CacheConfig.coerce`` accepts, which is returned as it is.

    Returns
    -------
    Any
        ``{"data_set": {...}, "raycache": {...}}`` for a mapping; ``config`` otherwise.
    """
    if not isinstance(config, Mapping):
        return config
    return {table: _plain(config[table]) for table in _TABLES if table in config}


def plain_item(item: Any) -> Any:
    """Return ``item`` with every ``str``/``int``/``float`` subclass made the plain type.

    Dicts, lists and tuples are rebuilt only where something inside changed, so an item
    of plain values costs one walk and no copy. Arrays are left as they are.

    Parameters
    ----------
    item : Any
        A field dict as Hyrax inserts it.

    Returns
    -------
    Any
        The same values, with plain keys and scalars.
    """
    if isinstance(item, dict):
        out = {_plain_scalar(k): plain_item(v) for k, v in item.items()}
        same = all(a is b for a, b in zip(item, out)) and all(
            out[k] is v for k, v in zip(out, item.values())
        )
        return item if same else out
    if isinstance(item, list | tuple):
        out = [plain_item(v) for v in item]
        if all(a is b for a, b in zip(item, out)):
            return item
        return out if isinstance(item, list) else tuple(out)
    return _plain_scalar(item)


def _plain_scalar(value: Any) -> Any:
    kind = type(value)
    if kind in (str, int, float, bool) or not isinstance(value, str | int | float):
        return value
    return _plain(value)
