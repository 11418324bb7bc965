"""Items a trainer is reading during a preload, which the preload then leaves to it.

While a preload runs, a trainer reads some items itself: the misses of its batches that
no preload unit holds, and spare items while it waits for a unit. Before this module
(2026-12-02) the preload did not learn of those reads until the trainer's inserts reached
the actor (every ``flush_interval_s``), and a unit is claimed before its reads start:
units claimed in between read the same items again. Measured with 4,096 items of 2 ms I/O each, the
trainer read ~450 items, and 225-345 of them were read again by a preload task.

So the trainer reserves what it is about to read, in the same call that tells it which
misses a unit holds, and the preload's units leave reserved items out. A reservation is
a lease: a trainer that dies, or whose read fails, never stores its items. The preload
reads those after its other units, once each lease has expired or its client has gone
(``CacheDirectory`` releases a detached or silent client's reservations).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["Reservations"]


class Reservations:
    """Leases on provider indices, each held by one client until a deadline.

    Not thread-safe: ``PreloadRun`` calls it under its claim lock.
    """

    def __init__(self) -> None:
        self._lease: dict[int, tuple[str, float]] = {}  # index -> (client id, lease end)

    def __len__(self) -> int:
        return len(self._lease)

    def add(self, client_id: str, indices: np.ndarray, lease_s: float) -> None:
        """Reserve ``indices`` for ``client_id`` for ``lease_s`` seconds from now.

        Parameters
        ----------
        client_id : str
            The reading client.
        indices : np.ndarray
            Provider indices. One reserved by another client passes to this one: the
            last reader to ask is the one the preload waits for.
        lease_s : float
            Seconds until the preload may read them itself.
        """
        until = time.monotonic() + lease_s
        for idx in indices.tolist():
            self._lease[idx] = (client_id, until)

    def release(self, client_id: str, indices: np.ndarray | None = None) -> None:
        """End ``client_id``'s leases (on ``indices``, or all of them) now.

        Parameters
        ----------
        client_id : str
            The client whose leases end.
        indices : np.ndarray, optional
            Only these indices; None: every lease the client holds.
        """
        keys = self._lease if indices is None else indices.tolist()
        for idx in [i for i in keys if self._lease.get(i, ("", 0.0))[0] == client_id]:
            self._lease[idx] = (client_id, 0.0)

    def live(self, start: int, stop: int) -> np.ndarray:
        """Return the indices in ``[start, stop)`` whose lease has not ended."""
        now = time.monotonic()
        held = [i for i, (_, until) in self._lease.items() if start <= i < stop and until > now]
        return np.array(held, dtype=np.int64)

    def live_count(self) -> int:
        """Return how many leases have not ended."""
        now = time.monotonic()
        return sum(until > now for _, until in list(self._lease.values()))

    def keep_only(self, indices: np.ndarray) -> None:
        """Forget every lease but those on ``indices`` (the ones not stored yet)."""
        keep = set(indices.tolist())
        self._lease = {i: lease for i, lease in self._lease.items() if i in keep}

    def indices(self) -> np.ndarray:
        """Return every reserved index, leases ended or not."""
        return np.fromiter(self._lease, dtype=np.int64, count=len(self._lease))

    def take_expired(self) -> np.ndarray:
        """Remove the leases that have ended; return their indices, sorted."""
        now = time.monotonic()
        ended = sorted(i for i, (_, until) in self._lease.items() if until <= now)
        for idx in ended:
            del self._lease[idx]
        return np.array(ended, dtype=np.int64)

    def next_end(self) -> float | None:
        """Return the seconds until the next lease ends (0 if one has), or None if none."""
        if not self._lease:
            return None
        return max(0.0, min(until for _, until in self._lease.values()) - time.monotonic())
