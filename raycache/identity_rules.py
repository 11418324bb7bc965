"""What a cache identity leaves out: the one rule, as names and kinds of values.

A cache identity must change when the items change and stay put when only how they are
sampled, batched or served changes. This module holds that rule (``docs/identity.md``)
and nothing else, so it can be read and reviewed in one place:

- values that are process machinery (loggers, locks, threads, executors, queues,
  sockets, modules, frames, generators) or the provider's own cache (anything with
  ``try_fetch`` and ``insert_into_cache``) never count: they differ per process and say
  nothing about what an item is;
- attributes and mapping keys named in ``LEFT_OUT_NAMES`` (sampler splits, DataLoader
  options) never count, wherever they appear;
- in a Hyrax config, only the tables and keys that can change items count:
  ``HYRAX_LEFT_OUT_TABLES`` and ``HYRAX_LEFT_OUT_DATA_SET_KEYS`` are dropped, and of
  ``general`` only ``data_dir`` is kept.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import types
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

__all__ = [
    "HYRAX_LEFT_OUT_DATA_SET_KEYS",
    "HYRAX_LEFT_OUT_TABLES",
    "LEFT_OUT_NAMES",
    "instance_fields",
    "is_hyrax_config",
    "is_left_out",
    "items_view",
    "kept_attributes",
]

# Attribute names and mapping keys that steer how items are sampled or batched, never
# what an item is: Hyrax's split_fraction/split_indices (applied by samplers) and the
# DataLoader's options. "shuffle" is not here: a provider may permute its own items.
LEFT_OUT_NAMES = frozenset(
    {
        "split_fraction",
        "split_indices",
        "batch_size",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "drop_last",
    }
)

# Tables of a Hyrax config that only the model, the training loop, inference, the
# vector database, the downloader or raycache itself read.
HYRAX_LEFT_OUT_TABLES = frozenset(
    {
        "model",
        "criterion",
        "optimizer",
        "scheduler",
        "train",
        "test",
        "infer",
        "onnx",
        "data_loader",
        "vector_db",
        "results",
        "umap",
        "visualize",
        "engine",
        "download",
        "raycache",
    }
)
# Hyrax's general table: only data_dir can say where items come from.
_HYRAX_GENERAL_KEPT = frozenset({"data_dir"})
# data_set keys Hyrax uses for the cache itself, for splits made by samplers
# (train/validate/test_size, and seed, which Hyrax uses only to shuffle splits and
# samplers) and for NaN handling, which Hyrax applies in collate, after the cache.
HYRAX_LEFT_OUT_DATA_SET_KEYS = frozenset(
    {
        "use_cache",
        "preload_cache",
        "preload_threads",
        "train_size",
        "validate_size",
        "test_size",
        "seed",
        "nan_mode",
        "nan_quantile",
    }
)

_MACHINERY: tuple[type, ...] = (
    logging.Logger,
    logging.LoggerAdapter,
    logging.Handler,
    threading.Thread,
    threading.Event,
    threading.Condition,
    threading.Semaphore,
    type(threading.Lock()),
    type(threading.RLock()),
    Executor,
    queue.Queue,
    socket.socket,
    types.ModuleType,
    types.FrameType,
    types.GeneratorType,
)


def _is_cache(obj: Any) -> bool:
    """Return True for an object with Hyrax's cache interface (the provider's own cache)."""
    kind = type(obj)
    return callable(getattr(kind, "try_fetch", None)) and callable(
        getattr(kind, "insert_into_cache", None)
    )


def is_left_out(value: Any) -> bool:
    """Return True if a value never counts, by its kind.

    Parameters
    ----------
    value : Any
        An attribute value or a mapping value.

    Returns
    -------
    bool
        True for process machinery and for the provider's own cache.
    """
    return isinstance(value, _MACHINERY) or _is_cache(value)


def is_hyrax_config(obj: Mapping) -> bool:
    """Return True if a mapping looks like a Hyrax config (a ``data_set`` table and more).

    Parameters
    ----------
    obj : Mapping
        Any mapping met while digesting.

    Returns
    -------
    bool
        True when ``data_set`` is a table and ``data_request`` or ``general`` is too.
    """
    return isinstance(obj.get("data_set"), Mapping) and (
        isinstance(obj.get("data_request"), Mapping) or isinstance(obj.get("general"), Mapping)
    )


def items_view(config: Mapping) -> dict:
    """Return the part of a Hyrax config that can change items.

    Parameters
    ----------
    config : Mapping
        A Hyrax config (see :func:`is_hyrax_config`).

    Returns
    -------
    dict
        The config less the tables and keys this module's rule leaves out.
    """
    out = {}
    for key, value in config.items():
        if not isinstance(key, str) or key in HYRAX_LEFT_OUT_TABLES:
            continue
        if key.startswith("torch.optim"):  # optimizer and scheduler parameter tables
            continue
        if key == "general" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k in _HYRAX_GENERAL_KEPT}
        elif key == "data_set" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in HYRAX_LEFT_OUT_DATA_SET_KEYS}
        out[key] = value
    return out


def kept_attributes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return an object's attributes less those left out by name or by kind.

    Parameters
    ----------
    state : Mapping
        Attribute name to value (``__dict__`` and slots).

    Returns
    -------
    dict
        The attributes that count.
    """
    return {
        k: v
        for k, v in state.items()
        if not (isinstance(k, str) and k in LEFT_OUT_NAMES) and not is_left_out(v)
    }


def instance_fields(obj: Any) -> dict[str, Any] | None:
    """Return an object's attributes from ``__dict__`` and ``__slots__``.

    Parameters
    ----------
    obj : Any
        Any object.

    Returns
    -------
    dict or None
        Attribute name to value (``__dict__`` wins over a slot of the same name); None
        when the object has neither a ``__dict__`` nor set slots (C extension types).
    """
    state = getattr(obj, "__dict__", None)
    fields = {}
    for kind in type(obj).__mro__:
        for slot in getattr(kind, "__slots__", ()) or ():
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                if hasattr(obj, slot):
                    fields[slot] = getattr(obj, slot)
    if not isinstance(state, dict) and not fields:
        return None
    if isinstance(state, dict):
        fields.update(state)
    return fields
