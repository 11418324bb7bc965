"""Default cache names: the same provider in every process gets the same name.

With a stock Hyrax config there is no ``raycache.name``. Two processes of one job
(DDP ranks, spawned DataLoader workers) that build the same provider must land on the
same cache, and Hyrax's train, validate and infer providers must not. The name is a
digest of the provider's class, length and state, computed so that it is the same in
every process: no ``repr`` that shows a memory address, no set iteration order, and
no hash() (salted per process).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["default_name", "fingerprint", "stable_digest"]

_MAX_DEPTH = 6
_MAX_ARRAY_BYTES = 1 << 20


def _feed(h: Any, obj: Any, depth: int, seen: set[int]) -> None:
    kind = type(obj)
    h.update(f"<{kind.__module__}.{kind.__qualname__}>".encode())
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(repr(obj).encode())
        return
    if isinstance(obj, np.generic):
        h.update(repr(obj.item()).encode())
        return
    if depth >= _MAX_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype.str}{obj.shape}".encode())
        if not obj.dtype.hasobject:
            h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8)[:_MAX_ARRAY_BYTES])
        return
    if isinstance(obj, dict):
        parts = []
        for k, v in obj.items():
            sub = hashlib.sha256()
            _feed(sub, k, depth + 1, seen)
            _feed(sub, v, depth + 1, seen)
            parts.append(sub.digest())
        for part in sorted(parts):
            h.update(part)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _feed(h, v, depth + 1, seen)
        return
    if isinstance(obj, (set, frozenset)):
        parts = []
        for v in obj:
            sub = hashlib.sha256()
            _feed(sub, v, depth + 1, seen)
            parts.append(sub.digest())
        for part in sorted(parts):
            h.update(part)
        return
    if callable(obj) and not hasattr(obj, "__dict__"):
        h.update(getattr(obj, "__qualname__", "").encode())
        return
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        from raycache.data_cache import DataCache  # a provider holds its own cache

        _feed(
            h,
            {k: v for k, v in state.items() if not isinstance(v, DataCache)},
            depth + 1,
            seen,
        )


def stable_digest(obj: Any) -> str:
    """Return a hex digest of an object's value that is the same in every process.

    Parameters
    ----------
    obj : Any
        Any object; unknown objects contribute their class and their ``__dict__``.

    Returns
    -------
    str
        A SHA-256 hex digest.
    """
    h = hashlib.sha256()
    _feed(h, obj, 0, set())
    return h.hexdigest()


def fingerprint(provider: Any, length: int) -> str:
    """Describe a provider for the cache's mismatch check: class and length.

    Parameters
    ----------
    provider : Any
        The provider.
    length : int
        ``len(provider)``.

    Returns
    -------
    str
        ``"module.Class[length]"``.
    """
    kind = type(provider)
    return f"{kind.__module__}.{kind.__qualname__}[{length}]"


def default_name(provider: Any, length: int) -> str:
    """Return the cache name used when the config sets no ``raycache.name``.

    Parameters
    ----------
    provider : Any
        The provider.
    length : int
        ``len(provider)``.

    Returns
    -------
    str
        ``"<Class>-<16 hex digits>"``.
    """
    digest = stable_digest((fingerprint(provider, length), provider))
    return f"{type(provider).__name__}-{digest[:16]}"
