"""Fill a shared cache from Hyrax's reads with each item read once, across processes.

``OnceFill`` wraps one shared cache (``raycache.DataCache``) with the claim protocol of
``raycache.hyrax.claims``: a miss claims the index; the claimer reads it (in Hyrax's
``resolve_data``) and its insert is sent to the cache at once, then the claim is ended;
a process that misses a claimed index waits for that, syncs its map and fetches the
item. Sending each claimed insert at once (instead of buffering it for up to
``flush_interval_s``) is what lets the waiters see it: it costs one actor call per item
while the cache fills, small next to the item's read.

Works in processes connected to Ray; a forked DataLoader worker goes through its parent
(``raycache.hyrax.fork_channel``), which runs this on its behalf.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from raycache.errors import ray_errors_as_plain
from raycache.hyrax.claims import board

__all__ = ["WAIT_S", "OnceFill"]

logger = logging.getLogger(__name__)

WAIT_S = 30.0  # longest wait for another process's read of a claimed item


class OnceFill:
    """One shared cache, filled with each index read once across every process.

    Parameters
    ----------
    shared : raycache.DataCache
        The attached shared cache.
    """

    def __init__(self, shared: Any):
        self.shared = shared
        self._mine: set[int] = set()  # indices this process claimed and has not stored
        self._lock = threading.Lock()
        self._board: Any = None
        self._owner = f"{os.getpid()}-{id(self):x}"

    def _claims(self) -> Any:
        if self._board is None:
            self._board = board(self.shared.config.namespace)
        return self._board

    def fetch(self, idx: int) -> Any:
        """Return the item, or None: then the caller must read it (it holds the claim).

        Parameters
        ----------
        idx : int
            The index.

        Returns
        -------
        Any
            The cached item, or None.
        """
        item = self.shared.try_fetch(idx)
        client = self.shared.client
        if item is not None or client is None or not self.shared.using_cache():
            return item
        name = self.shared.name
        with ray_errors_as_plain(f"claiming item {idx} of cache {name!r}"):
            claims = self._claims()
            if ray.get(claims.claim.remote(name, idx, self._owner), timeout=WAIT_S):
                with self._lock:
                    self._mine.add(int(idx))
                return None
            ray.get(claims.wait.remote(name, idx, WAIT_S), timeout=WAIT_S + 5.0)
        # The claimer sent the item before ending its claim: learn of it now, not after
        # the map's usual rate limit.
        client.sync(force=True)
        return self.shared.try_fetch(idx)

    def insert(self, idx: int, data: Any) -> None:
        """Insert ``data``; if this process claimed ``idx``, send it now and end the claim.

        Parameters
        ----------
        idx : int
            The index.
        data : Any
            The item.
        """
        self.shared.insert_into_cache(idx, data)
        with self._lock:
            mine = int(idx) in self._mine
            self._mine.discard(int(idx))
        if not mine:
            return
        name = self.shared.name
        if not self.shared.flush():
            logger.warning("raycache %s: item %d was not sent in time", name, idx)
        with ray_errors_as_plain(f"ending the claim on item {idx} of cache {name!r}"):
            ray.get(self._claims().done.remote(name, idx), timeout=WAIT_S)
