"""What a reader of a ``DataCache`` does about its misses while the cache's preload runs.

``CachedDataset`` (or any reader built on ``DataCache``) asks, for the misses of a
batch, which ones a preload unit is reading (wait for those) and which are reserved for
this process (read those now, alongside the preload); it waits for a unit while
reading spare items, and gives back a reserved index it could not read. These are the
four calls here, on top of ``raycache.client.PreloadWaits``, counting a miss that a
wait turned into a hit as a hit.

Each call is a no-op (nothing held, nothing to wait for) while the cache is not in use
or not attached in this process, so a reader needs no checks of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from raycache.client import CacheClient
    from raycache.data_cache import DataCache

__all__ = ["MissReads"]


class MissReads:
    """A reader's side of sharing the work of filling a cache with its preload.

    Parameters
    ----------
    cache : DataCache
        The cache read from.
    """

    def __init__(self, cache: DataCache):
        self._cache = cache

    def _client(self) -> CacheClient | None:
        client = self._cache.client
        return client if client is not None and self._cache.using_cache() else None

    def being_preloaded(self, indices: np.ndarray, spares: bool = False) -> np.ndarray:
        """Return, per index, whether a preload task is reading it (worth waiting for).

        The others are reserved for this process while a preload runs: the caller
        reads them (or calls ``release_reserved``).

        Parameters
        ----------
        indices : numpy.ndarray
            Missed indices.
        spares : bool
            The caller reads spare items while it waits (``spare_index``): reserve a
            block of them too.

        Returns
        -------
        numpy.ndarray
            A bool per index.
        """
        client = self._client()
        if client is None:
            return np.zeros(len(indices), dtype=bool)
        return client.waits.being_preloaded(np.asarray(indices, dtype=np.int64), spares)

    def await_preloaded(self, idx: int, meanwhile: Callable[[], bool] | None = None) -> Any:
        """Wait for an index a preload task is reading; return the item, or None.

        For a miss that ``DataCache.fetch_many(..., wait=False)`` has counted already:
        when the item arrives, that miss is counted as a hit instead.

        Parameters
        ----------
        idx : int
            A validated index.
        meanwhile : Callable[[], bool], optional
            Called while the unit is being read, until it returns False.

        Returns
        -------
        Any
            The item, or None if the unit ended without it.
        """
        client = self._client()
        if client is None:
            return None
        copy = not self._cache.config.zero_copy
        item = client.get(idx, copy, wait=True, meanwhile=meanwhile)
        if item is not None:
            client.count(hits=1, misses=-1)
        return item

    def spare_index(self) -> int | None:
        """Return an index reserved for this process to read while it waits, or None.

        Returns
        -------
        int or None
            The index, or None when no preload runs or none is left.
        """
        client = self._client()
        return None if client is None else client.waits.spare_index()

    def release_reserved(self, idx: int) -> None:
        """Give back an index this process reserved and could not read: the preload will.

        Parameters
        ----------
        idx : int
            The index.
        """
        client = self._client()
        if client is not None:
            client.waits.release_reserved([idx])
