"""Fill a shared cache from Hyrax's reads with each item read once, across processes.

``OnceFill`` wraps one shared cache (``raycache.DataCache``) with the claim protocol of
``raycache.hyrax.claims``: a miss claims the index; the claimer reads it (in Hyrax's
``resolve_data``) and its insert is sent to the cache at once, then the claim is ended;
a process that misses a claimed index waits for that, syncs its map and fetches the
item. Claimed inserts are sent in batches, every ``SEND_ITEMS`` items or ``SEND_AFTER_S``
seconds, whichever comes first (a thread sees to the second), and their claims are ended
in one call after the batch was stored: a miss costs one actor call (the claim), and a
process waiting for another's read waits at most about ``SEND_AFTER_S`` plus that read.

A reader that asks again for an index it claimed and has not stored (its read failed, or
it looked before reading) is told to read it at once: it never waits for its own claim.
Readers are this process or, through ``raycache.hyrax.fork_channel``, one of its forked
workers; two readers never both hold an index, and the claims of a worker that exits
unstored are ended, so that no other reader waits for them.

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
from raycache.hyrax.claims import MINE, STORED, board

__all__ = ["WAIT_S", "OnceFill"]

logger = logging.getLogger(__name__)

WAIT_S = 30.0  # longest wait for another process's read of a claimed item
SEND_ITEMS = 32
SEND_AFTER_S = 0.2
_UNCLAIMED = object()  # no reader holds the index


class OnceFill:
    """One shared cache, filled with each index read once across every process.

    Parameters
    ----------
    shared : raycache.DataCache
        The attached shared cache.
    """

    def __init__(self, shared: Any):
        self.shared = shared
        self._mine: dict[int, Any] = {}  # claimed, not stored: index -> its reader
        self._stored: list[int] = []  # claimed, inserted, not yet sent
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._board: Any = None
        self._owner = f"{os.getpid()}-{id(self):x}"
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None

    def _claims(self) -> Any:
        if self._board is None:
            self._board = board(self.shared.config.namespace)
        return self._board

    def fetch(self, idx: int, reader: Any = None) -> Any:
        """Return the item, or None: then the caller must read it (it holds the claim).

        Parameters
        ----------
        idx : int
            The index.
        reader : hashable, optional
            Who reads the item on a miss: None for this process, else a key of one of
            its forked workers.

        Returns
        -------
        Any
            The cached item, or None.
        """
        item = self.shared.try_fetch(idx)
        client = self.shared.client
        if item is not None or client is None or not self.shared.using_cache():
            return item
        with self._lock:
            if self._mine.get(int(idx), _UNCLAIMED) == reader:
                return None  # claimed by this reader already: read it, never wait for it
        name = self.shared.name
        with ray_errors_as_plain(f"claiming item {idx} of cache {name!r}"):
            claims = self._claims()
            answer = ray.get(claims.claim.remote(name, idx, self._owner), timeout=WAIT_S)
            if answer == STORED:  # since this process's map last caught up: learn of it
                client.sync(force=True)
                item = self.shared.try_fetch(idx)
                if item is not None:
                    return item
                answer = ray.get(claims.claim.remote(name, idx, self._owner, False), timeout=WAIT_S)
            if answer == MINE:
                with self._lock:
                    self._mine[int(idx)] = reader
                return None
            ray.get(claims.wait.remote(name, idx, WAIT_S), timeout=WAIT_S + 5.0)
        # The claimer sent the item before ending its claim: learn of it now, not after
        # the map's usual rate limit.
        client.sync(force=True)
        return self.shared.try_fetch(idx)

    def insert(self, idx: int, data: Any) -> None:
        """Insert ``data``; if this process claimed ``idx``, send it soon and end the claim.

        Parameters
        ----------
        idx : int
            The index.
        data : Any
            The item.
        """
        self.shared.insert_into_cache(idx, data)
        with self._lock:
            if self._mine.pop(int(idx), _UNCLAIMED) is _UNCLAIMED:
                return
            self._stored.append(int(idx))
            full = len(self._stored) >= SEND_ITEMS
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_every, name="raycache-claimed-sends", daemon=True
                )
                self._sender.start()
        if full:
            self.send()

    def send(self) -> None:
        """Send the claimed items inserted so far, then end their claims."""
        with self._send_lock:
            with self._lock:
                stored, self._stored = self._stored, []
            if not stored:
                return
            name = self.shared.name
            if not self.shared.flush():
                logger.warning(
                    "raycache %s: %d claimed items were not sent in time", name, len(stored)
                )
            with ray_errors_as_plain(f"ending claims on cache {name!r}"):
                # Not waited for: the items are stored; the waiters only need waking.
                self._claims().done_many.remote(name, stored)

    def release(self, reader: Any) -> None:
        """End the claims ``reader`` holds on items it has not stored (it is gone).

        Parameters
        ----------
        reader : hashable
            The reader, as passed to ``fetch``.
        """
        with self._lock:
            gone = [idx for idx, who in self._mine.items() if who == reader]
            for idx in gone:
                del self._mine[idx]
        if gone:
            with ray_errors_as_plain(f"ending claims on cache {self.shared.name!r}"):
                # Waiters wake, find the items missing and claim them for themselves.
                self._claims().done_many.remote(self.shared.name, gone)

    def _send_every(self) -> None:
        while not self._stop.wait(SEND_AFTER_S):
            try:
                self.send()
            except Exception as exc:
                if isinstance(exc, RuntimeError) and "after shutdown" in str(exc):
                    # The interpreter is exiting and the client's sender pool is gone:
                    # the client's own exit hook sends what it buffered.
                    return
                # The next round tries again; the claims expire meanwhile.
                logger.exception("raycache %s: sending claimed items failed", self.shared.name)

    def close(self) -> None:
        """Send what is pending and stop the sending thread."""
        self._stop.set()
        self.send()
