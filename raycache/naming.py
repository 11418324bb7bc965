"""Default cache names and fingerprints, as :mod:`raycache.identity` derives them.

Kept for callers of ``default_name``/``fingerprint``; the rule (what goes into a cache's
identity and what is left out) lives in :mod:`raycache.identity`. This module imports no
other part of raycache that could import it back.
"""

from __future__ import annotations

from typing import Any

from raycache.identity import derive_identity, stable_digest

__all__ = ["default_name", "fingerprint", "stable_digest"]


def fingerprint(provider: Any, length: int, stated: str | None = None) -> str:
    """Describe a provider for the cache's mismatch check.

    Parameters
    ----------
    provider : Any
        The provider.
    length : int
        ``len(provider)``.
    stated : str, optional
        ``raycache.identity`` from the config.

    Returns
    -------
    str
        ``CacheIdentity.fingerprint``: class, length, short digest and per-field digests.
    """
    return derive_identity(provider, length, stated).fingerprint


def default_name(provider: Any, length: int, stated: str | None = None) -> str:
    """Return the cache name used when the config sets no ``raycache.name``.

    Parameters
    ----------
    provider : Any
        The provider.
    length : int
        ``len(provider)``.
    stated : str, optional
        ``raycache.identity`` from the config.

    Returns
    -------
    str
        ``"<Class>-<16 hex digits>"``.
    """
    return derive_identity(provider, length, stated).name
