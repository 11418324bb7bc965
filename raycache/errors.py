"""Exceptions raycache raises, in one place so users can catch them by type.

Where Hyrax's seed raised a built-in type (``RuntimeError`` for a bad index type or an
unsupported value, ``IndexError`` for an index out of range), raycache raises that type
or a subclass of it, so code written against the seed keeps working.
"""

from __future__ import annotations

from raycache.config import ConfigError
from raycache.values import UnsupportedValueError

__all__ = [
    "CacheMismatchError",
    "CacheUnavailableError",
    "ConfigError",
    "ProviderNotPicklableError",
    "UnsupportedValueError",
]


class CacheMismatchError(ValueError):
    """A cache name is already used by a cache of a different provider or length."""


class ProviderNotPicklableError(TypeError):
    """The provider cannot be pickled, so Ray tasks cannot run it to preload."""


class CacheUnavailableError(RuntimeError):
    """The cache's directory actor is gone or did not answer in time."""
