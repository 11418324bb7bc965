"""Cache identity: what a provider's cache is of, equal in every process that builds it.

Two processes that build the same provider over the same data must land on the same
cache, and two providers whose items differ must not. This module turns a provider into
a :class:`CacheIdentity` (its class ``__qualname__``, its length and a digest) and
guarantees:

- **What determines items is kept; what does not is left out, by one rule**
  (``docs/identity.md``, :mod:`raycache.identity_rules`), and values are digested the
  same way in every process, wherever the class was defined (:mod:`raycache.digest`).
- **Providers may state their identity**: a ``cache_identity()`` method, or the
  ``raycache.identity`` config key, replaces the digest of the provider's state; the class
  ``__qualname__`` and the length still count.
- **Taken once per provider object**: state that changes as a provider serves items
  (read counters) cannot move a second ``DataCache`` over the same provider elsewhere.

The fingerprint the cache's actor compares, and the message when two differ, are in
:mod:`raycache.fingerprint`; the names below are re-exported here for callers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import weakref
from typing import Any

from raycache.digest import MAX_DEPTH, Digester, stable_digest
from raycache.fingerprint import format_fingerprint, mismatch_message
from raycache.identity_rules import (
    HYRAX_LEFT_OUT_DATA_SET_KEYS,
    HYRAX_LEFT_OUT_TABLES,
    LEFT_OUT_NAMES,
    instance_fields,
    kept_attributes,
)

__all__ = [
    "CacheIdentity",
    "HYRAX_LEFT_OUT_DATA_SET_KEYS",
    "HYRAX_LEFT_OUT_TABLES",
    "LEFT_OUT_NAMES",
    "derive_identity",
    "mismatch_message",
    "stable_digest",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What a cache is of: a provider's class, length and the digest of what makes its items.

    Parameters
    ----------
    qualname : str
        The provider class's ``__qualname__`` (no module).
    length : int
        ``len(provider)``.
    digest : str
        SHA-256 hex digest of qualname, length, source and every field.
    source : str
        ``"state"`` (derived), ``"cache_identity()"`` or ``"raycache.identity"``.
    fields : tuple of (str, str)
        Each field that went into the digest and its hex digest, by name.
    left_out : tuple of str
        Attributes of the provider left out by the rule.
    opaque : tuple of str
        Classes of values that could only contribute their class name.
    """

    qualname: str
    length: int
    digest: str
    source: str
    fields: tuple[tuple[str, str], ...]
    left_out: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Default cache name: ``"<Class>-<16 hex digits>"``."""
        return f"{self.qualname.rsplit('.', 1)[-1]}-{self.digest[:16]}"

    @property
    def fingerprint(self) -> str:
        """One readable line the cache's actor compares: class, length, digest, fields."""
        return format_fingerprint(
            self.qualname, self.length, self.digest, self.source, self.fields, self.left_out
        )


# (id(provider), length, stated) -> identity, for providers alive in this process.
_taken: dict[tuple[int, int, str | None], CacheIdentity] = {}
_taken_lock = threading.Lock()


def derive_identity(provider: Any, length: int, stated: str | None = None) -> CacheIdentity:
    """Compute a provider's cache identity, once per provider object in a process.

    Precedence: ``stated`` (the ``raycache.identity`` config key), then the provider's
    ``cache_identity()`` method, then the digest of the provider's attributes under the
    rule in ``docs/identity.md``.

    The identity is taken the first time it is asked for and kept while the provider
    lives: a provider's read counters and other state that changes as it serves items
    must not move a second ``DataCache`` over the same provider to another cache.

    Parameters
    ----------
    provider : Any
        A Hyrax DataProvider or a map-style dataset.
    length : int
        ``len(provider)``.
    stated : str, optional
        ``raycache.identity`` from the config.

    Returns
    -------
    CacheIdentity
        The identity; ``.name`` is the default cache name, ``.fingerprint`` the line the
        cache's actor compares.

    Raises
    ------
    TypeError
        If ``cache_identity`` exists but is not callable.
    """
    key = (id(provider), int(length), stated)
    with _taken_lock:
        known = _taken.get(key)
    if known is not None:
        return known
    identity = _derive(provider, length, stated)
    try:
        weakref.finalize(provider, _forget, key)
    except TypeError:  # not weak-referenceable: no way to know when the id is reused
        return identity
    with _taken_lock:
        return _taken.setdefault(key, identity)


def _forget(key: tuple[int, int, str | None]) -> None:
    with _taken_lock:
        _taken.pop(key, None)


def _derive(provider: Any, length: int, stated: str | None) -> CacheIdentity:
    qualname = type(provider).__qualname__
    digester = Digester()
    left_out: tuple[str, ...] = ()
    hook = getattr(type(provider), "cache_identity", None)
    if stated is not None:
        source = "raycache.identity"
        fields = (("identity", digester.digest(stated).hex()),)
    elif hook is not None:
        if not callable(hook):
            raise TypeError(
                f"{qualname}.cache_identity must be a method returning the value that "
                f"identifies the provider's items, got {type(hook).__name__}"
            )
        source = "cache_identity()"
        value = provider.cache_identity()
        fields = (("value", digester.digest(value).hex()),)
    else:
        source = "state"
        state = instance_fields(provider) or {}
        kept = kept_attributes(state)
        left_out = tuple(sorted(str(k) for k in state if k not in kept))
        digester.enclose(provider)  # references back to the provider are cycles
        fields = tuple(
            (str(k), digester.digest(v).hex())
            for k, v in sorted(kept.items(), key=lambda kv: str(kv[0]))
        )
    full = hashlib.sha256(repr((qualname, int(length), source, fields)).encode()).hexdigest()
    opaque = tuple(sorted(digester.opaque))
    if opaque or digester.too_deep:
        logger.warning(
            "raycache: the identity of %s takes only the class name of %s%s; if these "
            "decide what the items are, define %s.cache_identity() or set raycache.identity",
            qualname,
            ", ".join(opaque) or "nothing",
            f" and skips objects nested deeper than {MAX_DEPTH}" if digester.too_deep else "",
            qualname,
        )
    return CacheIdentity(qualname, int(length), full, source, fields, left_out, opaque)
