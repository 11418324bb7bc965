"""What happens when a provider asks for a cache that holds another provider's items.

``raycache.on_mismatch`` decides: ``"error"`` (the default) raises the
``CacheMismatchError`` the cache's actor gave, which says what differs and what to do;
``"rebuild"`` drops the old cache and attaches again, so the cache is refilled from this
provider. A rebuild is tried once per attach: if the second attach does not match either
(another process rebuilt the cache for its own provider in between), the error is
raised, because two jobs that keep replacing each other's cache would each read
everything from their provider while looking cached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from raycache.errors import CacheMismatchError, plain_error

__all__ = ["ON_MISMATCH_CHOICES", "attach_with_policy"]

logger = logging.getLogger(__name__)

ON_MISMATCH_CHOICES = ("error", "rebuild")

T = TypeVar("T")


def _as_mismatch(exc: BaseException) -> CacheMismatchError | None:
    plain = plain_error(exc)
    return plain if isinstance(plain, CacheMismatchError) else None


def attach_with_policy(
    make_client: Callable[[], T],
    drop: Callable[[], object],
    on_mismatch: str,
    name: str = "",
) -> T:
    """Attach with ``make_client``; on a mismatch, raise or drop and attach again.

    Parameters
    ----------
    make_client : callable
        Attaches and returns the client; raises ``CacheMismatchError`` (plain, or
        wrapped by Ray in a ``RayTaskError``) when the cache holds another provider.
    drop : callable
        Drops the cache under this name and returns once the name is free.
    on_mismatch : str
        ``"error"`` or ``"rebuild"`` (``raycache.on_mismatch``).
    name : str, optional
        The cache name, for the log line.

    Returns
    -------
    T
        What ``make_client`` returned.

    Raises
    ------
    CacheMismatchError
        With ``"error"``, or when the attach after a rebuild does not match either.
    ValueError
        If ``on_mismatch`` is not one of ``ON_MISMATCH_CHOICES``.
    """
    if on_mismatch not in ON_MISMATCH_CHOICES:
        raise ValueError(
            f"on_mismatch must be one of {ON_MISMATCH_CHOICES}, got {on_mismatch!r}; "
            'set raycache.on_mismatch = "error" or "rebuild"'
        )
    try:
        return make_client()
    except Exception as exc:
        mismatch = _as_mismatch(exc)
        if mismatch is None:
            raise
        if on_mismatch == "error":
            raise mismatch from None
        logger.warning(
            "raycache %s: dropping the cache and refilling it from this provider "
            '(raycache.on_mismatch = "rebuild"): %s',
            name,
            mismatch,
        )
    drop()
    return _attach_after_rebuild(make_client)


def _attach_after_rebuild(make_client: Callable[[], T]) -> T:
    """Attach once more after a drop; a second mismatch is final (see the module docstring)."""
    try:
        return make_client()
    except Exception as exc:
        mismatch = _as_mismatch(exc)
        if mismatch is None:
            raise
        raise CacheMismatchError(
            f"{mismatch} The cache was rebuilt once and still does not match: another "
            "process attached with a different provider in between; give the two "
            "providers different raycache.name values."
        ) from None
