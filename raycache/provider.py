"""How raycache reads an item from a data provider, without going through the cache.

Two kinds of provider are accepted: Hyrax's DataProvider protocol (``len(p)`` and
``p.resolve_data(idx)``) and any map-style dataset (``len(p)`` and ``p[idx]``).
A Hyrax DataProvider holds a ``DataCache`` itself and consults it inside
``resolve_data``. When raycache reads the raw item (a preload task, or a
``CachedDataset`` miss) that inner cache must neither answer nor insert, or the item
would be looked up again and inserted twice (what Hyrax's own preloader does). The
``bypass`` flag below makes every ``DataCache`` in this thread inert while raycache
reads from the provider; a provider unpickled inside a preload task gets inert caches.
"""

from __future__ import annotations

import functools
import operator
import pickle
import threading
from collections.abc import Sequence
from typing import Any

import ray.cloudpickle as cloudpickle

from raycache.errors import ProviderNotPicklableError, note_provider_index

__all__ = [
    "bypass_active",
    "check_provider",
    "load_provider",
    "pickle_provider",
    "provider_length",
    "read_raw",
    "read_raw_many",
    "unpickling_for_task",
]

_local = threading.local()
_loading = threading.local()
_loaded: dict[str, Any] = {}
_loaded_lock = threading.Lock()


def bypass_active() -> bool:
    """Return True while raycache itself is reading from a provider in this thread."""
    return getattr(_local, "depth", 0) > 0


def unpickling_for_task() -> bool:
    """Return True while a preload task is unpickling its provider in this thread."""
    return getattr(_loading, "active", False)


class _Bypass:
    """Makes every DataCache in this thread inert while raycache reads (``bypass_active``).

    A class, not a generator context manager: a preload task enters it once per read,
    and ``contextlib`` costs several times as much per entry.
    """

    def __enter__(self) -> None:
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _local.depth -= 1


_bypass = _Bypass()


def check_provider(provider: Any) -> None:
    """Check that ``provider`` has a length and a way to read an item.

    Parameters
    ----------
    provider : Any
        A Hyrax DataProvider or a map-style dataset.

    Raises
    ------
    TypeError
        If it has no ``__len__`` or neither ``resolve_data`` nor ``__getitem__``.
    """
    if not hasattr(provider, "__len__"):
        raise TypeError(
            f"data provider of type {type(provider).__qualname__} has no __len__; "
            "raycache needs len(provider) and provider.resolve_data(idx) or provider[idx]"
        )
    if not (hasattr(provider, "resolve_data") or hasattr(provider, "__getitem__")):
        raise TypeError(
            f"data provider of type {type(provider).__qualname__} has neither "
            "resolve_data(idx) nor __getitem__(idx)"
        )


def provider_length(provider: Any) -> int:
    """Return ``len(provider)``, checked to be a non-negative int.

    Parameters
    ----------
    provider : Any
        The provider.

    Returns
    -------
    int
        Its length.
    """
    check_provider(provider)
    length = len(provider)
    if not isinstance(length, int) or length < 0:
        raise TypeError(f"len(provider) must be a non-negative int, got {length!r}")
    return length


def read_raw(provider: Any, idx: int) -> Any:
    """Read item ``idx`` from the provider, with every DataCache in this thread inert.

    Parameters
    ----------
    provider : Any
        A Hyrax DataProvider (``resolve_data``) or a map-style dataset (``[]``).
    idx : int
        The index.

    Returns
    -------
    Any
        The item as the provider returns it.
    """
    out: list = []
    read_raw_many(provider, (idx,), out)
    return out[0]


def read_raw_many(provider: Any, indices: Sequence[int], out: list) -> None:
    """Read items as ``read_raw`` does each, appending them to ``out`` as they are read.

    One bypass and one method lookup for the whole run: a provider whose items cost
    nothing (in memory, memory-mapped) is read at a few microseconds per item, which
    a per-item context manager would add to.

    Parameters
    ----------
    provider : Any
        A Hyrax DataProvider (``resolve_data``) or a map-style dataset (``[]``).
    indices : Sequence[int]
        The indices, in the order to read them.
    out : list
        Receives each item; when a read raises, it holds the items read before it
        (so ``indices[len(out)]`` is the one that failed).
    """
    if hasattr(provider, "resolve_data"):
        read = provider.resolve_data
    else:
        read = functools.partial(operator.getitem, provider)  # provider[idx]
    append = out.append
    with _bypass:
        idx = None
        try:
            for idx in indices:
                append(read(idx))
        except Exception as exc:  # the provider's own error, with the index it failed on
            note_provider_index(exc, idx)
            raise


def pickle_provider(provider: Any) -> bytes:
    """Pickle a provider for preload tasks, or say clearly why it cannot be.

    Parameters
    ----------
    provider : Any
        The provider.

    Returns
    -------
    bytes
        The pickled provider.

    Raises
    ------
    ProviderNotPicklableError
        If pickling fails; the message names the provider's type and the cause.
    """
    try:
        return cloudpickle.dumps(provider, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise ProviderNotPicklableError(
            f"data provider of type {type(provider).__module__}.{type(provider).__qualname__} "
            f"cannot be pickled ({type(exc).__name__}: {exc}); preload runs the provider in "
            "Ray tasks, which needs a picklable provider. Open files, locks and connections "
            "lazily (for example in the first read) instead of in __init__, or set "
            "data_set.preload_cache = false."
        ) from exc


def load_provider(key: str, blob: bytes) -> Any:
    """Unpickle a provider once per process for the preload run ``key``.

    Any DataCache inside the provider is restored inert: a preload task computes raw
    items and must not read from or insert into the cache it is filling.

    Parameters
    ----------
    key : str
        Identifies the preload run.
    blob : bytes
        The pickled provider.

    Returns
    -------
    Any
        The provider.

    Raises
    ------
    ProviderNotPicklableError
        If the provider cannot be unpickled in this process, typically because its
        class is in a module that Ray's worker processes cannot import.
    """
    with _loaded_lock:
        if key not in _loaded:
            _loading.active = True
            try:
                _loaded.clear()  # one preload run's provider per worker process at a time
                _loaded[key] = cloudpickle.loads(blob)
            except Exception as exc:
                raise ProviderNotPicklableError(_unpickle_advice(exc)) from exc
            finally:
                _loading.active = False
        return _loaded[key]


def _unpickle_advice(exc: BaseException) -> str:
    """Say why a provider did not unpickle in a Ray worker, and what to do about it."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    what = f"{type(exc).__name__}: {first}"
    if isinstance(exc, ImportError):
        return (
            f"the provider could not be unpickled in a Ray worker ({what}): Ray's worker "
            "processes must be able to import the provider's module. Install its package "
            "where Ray runs, start Ray with it on PYTHONPATH or in a runtime_env "
            "(working_dir or py_modules), call ray.cloudpickle.register_pickle_by_value("
            "module) before building the cache, or define the class in the training script. "
            "The workers have the PYTHONPATH of the process that started Ray (for raycache's "
            "node Ray, the first raycache process on the node), not the training script's"
        )
    return f"the provider could not be unpickled in a Ray worker ({what})"
