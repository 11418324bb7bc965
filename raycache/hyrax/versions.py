"""Which raycache cache class serves which Hyrax version.

Hyrax changed its cache API between 0.8 and 0.9 (``DataCache(config, data_provider)``
became ``DataCache(config, datasets, augment_active)``), so a cache class fits one range of
versions only. This module maps a version string to the class that speaks its API and
refuses, naming the supported ranges, any version it has not been written for: a cache
with the wrong constructor would fail deep inside Hyrax's ``DataProvider`` instead.
It imports neither Hyrax nor Ray.
"""

from __future__ import annotations

import re

__all__ = ["SUPPORTED", "UnsupportedHyraxError", "class_path_for", "parse_version"]

# (first, last) minor versions of the 0.x series and the class that serves them.
SUPPORTED: tuple[tuple[tuple[int, int], tuple[int, int], str], ...] = (
    ((0, 8), (0, 8), "raycache.data_cache:DataCache"),
    ((0, 9), (0, 13), "raycache.hyrax.cache_v09:DataCache"),
)


class UnsupportedHyraxError(RuntimeError):
    """The installed Hyrax version has a cache API raycache does not serve."""


def parse_version(version: str) -> tuple[int, int]:
    """Return ``(major, minor)`` of a version string such as ``"0.13"`` or ``"0.9.1.dev3"``.

    Parameters
    ----------
    version : str
        The version.

    Returns
    -------
    tuple of int
        Major and minor version.

    Raises
    ------
    UnsupportedHyraxError
        If the string does not start with ``<major>.<minor>``.
    """
    match = re.match(r"\s*v?(\d+)\.(\d+)", str(version))
    if match is None:
        raise UnsupportedHyraxError(
            f"cannot read Hyrax's version from {version!r}; raycache supports {describe()}"
        )
    return int(match.group(1)), int(match.group(2))


def describe() -> str:
    """Return the supported versions in words, e.g. ``"Hyrax 0.8.x and 0.9-0.13"``.

    Returns
    -------
    str
        The supported ranges.
    """
    parts = []
    for first, last, _ in SUPPORTED:
        if first == last:
            parts.append(f"{first[0]}.{first[1]}.x")
        else:
            parts.append(f"{first[0]}.{first[1]}-{last[0]}.{last[1]}")
    return "Hyrax " + " and ".join(parts)


def class_path_for(version: str) -> str:
    """Return ``"module:Class"`` of the cache class for a Hyrax version.

    Parameters
    ----------
    version : str
        Hyrax's ``__version__``.

    Returns
    -------
    str
        Where the class lives.

    Raises
    ------
    UnsupportedHyraxError
        If no raycache class serves that version; the message names the supported ones.
    """
    key = parse_version(version)
    for first, last, path in SUPPORTED:
        if first <= key <= last:
            return path
    raise UnsupportedHyraxError(
        f"Hyrax {version} is not supported by raycache: it supports {describe()}. "
        "Install a supported Hyrax, or leave Hyrax's own cache in place (do not call "
        "raycache.hyrax.install())."
    )
