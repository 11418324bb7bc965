"""Items a trainer reads itself during a preload: the leases on them and the policy.

While a preload runs, a trainer reads some items itself: the misses of its batches that no
preload unit holds, and spare items while it waits for a unit. The preload learns of an
insert only when it reaches the actor (every ``flush_interval_s``), and a unit is claimed
before its reads start, so without a reservation the units claimed in between would read
the same items again. A trainer therefore reserves what it is about to read, in the same
call that tells it which misses a unit holds, and the units leave reserved items out.

A reservation is a lease (``Reservations``): a trainer that dies, or whose read fails,
never stores its items, and the preload reads them after its other units once the lease
has ended or its client released it (``CacheDirectory`` releases a detached or silent
client's reservations).

``ReservationPolicy`` decides what a trainer may reserve: its share of a batch's misses
(the rest become the next unit), spare items from the top of what no unit has reached,
and how long a lease lasts. It holds no lock and calls no Ray: the preload scheduler
calls it under its claim lock and gives it the scheduler's frontier, so it can be
tested alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from raycache.protocol import HELD, READ_IT

__all__ = ["RESERVE_LEASE_S", "SPARE_SCAN", "ReservationPolicy", "Reservations"]

# A trainer's reservation lasts its reads' expected time plus this: time to insert them and
# for the insert to reach the actor (flush_interval_s, 0.1 s by default), with a margin for
# a loaded machine. Only a trainer that dies or fails a read makes the preload wait it out.
RESERVE_LEASE_S = 5.0
SPARE_SCAN = 1024  # indices scanned at a time for spare items to hand out

_EMPTY = np.zeros(0, dtype=np.int64)


class Reservations:
    """Leases on provider indices, each held by one client until a deadline.

    Not thread-safe: the preload scheduler calls it under its claim lock.

    Parameters
    ----------
    clock : Callable[[], float]
        Monotonic seconds (``time.monotonic``; a test passes its own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
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
        until = self._clock() + lease_s
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
            self._lease[idx] = (client_id, float("-inf"))

    def live(self, start: int, stop: int) -> np.ndarray:
        """Return the indices in ``[start, stop)`` whose lease has not ended.

        Parameters
        ----------
        start, stop : int
            The half-open span.

        Returns
        -------
        np.ndarray
            The live reserved indices in it, in no particular order.
        """
        now = self._clock()
        held = [i for i, (_, until) in self._lease.items() if start <= i < stop and until > now]
        return np.array(held, dtype=np.int64)

    def live_count(self) -> int:
        """Return how many leases have not ended (safe to call without the claim lock)."""
        now = self._clock()
        return sum(until > now for _, until in list(self._lease.values()))

    def keep_only(self, indices: np.ndarray) -> None:
        """Forget every lease but those on ``indices`` (the ones not stored yet).

        Parameters
        ----------
        indices : np.ndarray
            The indices whose leases to keep.
        """
        keep = set(indices.tolist())
        self._lease = {i: lease for i, lease in self._lease.items() if i in keep}

    def indices(self) -> np.ndarray:
        """Return every reserved index, leases ended or not."""
        return np.fromiter(self._lease, dtype=np.int64, count=len(self._lease))

    def take_expired(self) -> np.ndarray:
        """Remove the leases that have ended; return their indices, sorted."""
        now = self._clock()
        ended = sorted(i for i, (_, until) in self._lease.items() if until <= now)
        for idx in ended:
            del self._lease[idx]
        return np.array(ended, dtype=np.int64)

    def next_end(self) -> float | None:
        """Return the seconds until the next lease ends (0 if one has), or None if none."""
        if not self._lease:
            return None
        return max(0.0, min(until for _, until in self._lease.values()) - self._clock())


class ReservationPolicy:
    """What a trainer may read itself while a preload runs, and for how long.

    The scheduler passes its ``frontier`` (the first index no range unit has reached)
    and the indices ever wanted from it (items a trainer left to the preload: they are
    read, being read, or failed, and no trainer reserves them again). Spare items are
    handed out from the top of the index range down, so the units reach them last.

    Parameters
    ----------
    length : int
        Number of provider items.
    threads : int
        ``preload_threads``: reads in flight over all preload tasks.
    threads_per_task : int
        Reads in flight in one task.
    missing : Callable[[np.ndarray], np.ndarray]
        Returns the subset of indices not cached yet.
    clock : Callable[[], float]
        Monotonic seconds, for the leases.
    """

    def __init__(
        self,
        length: int,
        threads: int,
        threads_per_task: int,
        missing: Callable[[np.ndarray], np.ndarray],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threads = threads
        self.threads_per_task = threads_per_task
        self.leases = Reservations(clock)
        self._missing = missing
        self.spare_top = length  # spares are handed out from here down

    def beyond_share(self, mine: np.ndarray, frontier: int) -> np.ndarray:
        """Return the positions of the misses a trainer should leave to the next unit.

        A trainer reads its misses one at a time. When they are more than its share of
        what no unit has reached (near the end of a run, or any time in a small one),
        reading them all would outlast the preload's threads, which then idle: 64 misses
        of 2 ms are 0.13 s, when a preload of 256 such items takes about 0.1 s. Only for
        a trainer that asks for spares, which it reads while it waits.

        Parameters
        ----------
        mine : np.ndarray
            Boolean mask over the trainer's misses: those it would read itself that no
            unit has reached (at or past ``frontier``), ever-wanted ones excluded.
        frontier : int
            The first index no range unit has reached.

        Returns
        -------
        np.ndarray
            Positions (into the mask) beyond the trainer's share, possibly none.
        """
        positions = np.flatnonzero(mine)
        left = max(0, self.spare_top - frontier)
        # As many as a slot's threads read meanwhile, or the share of what is left.
        per_slot = -(-len(positions) // (self.threads_per_task + 1))
        share = max(1, left // (self.threads + 1), per_slot)
        return positions[share:] if len(positions) > share else _EMPTY

    def pick_spares(self, count: int, frontier: int, exclude: np.ndarray) -> np.ndarray:
        """Return up to ``count`` indices no unit has reached, nor anyone stored or reserved.

        Parameters
        ----------
        count : int
            Spares asked for.
        frontier : int
            The first index no range unit has reached: spares are at or above it.
        exclude : np.ndarray
            Indices never handed out as spares (ever wanted, the trainer's own misses).

        Returns
        -------
        np.ndarray
            The spares, from the top down.
        """
        # A trainer's share of what no unit has reached (it reads about as fast as one of
        # the preload's threads): near the end, spares beyond that would mostly be given
        # back unread, after units claimed meanwhile had left them out.
        count = min(count, max(1, (self.spare_top - frontier) // (self.threads + 1)))
        picked: list[int] = []
        while len(picked) < count and self.spare_top > frontier:
            base = max(frontier, self.spare_top - SPARE_SCAN)
            free = self._missing(np.arange(base, self.spare_top))[::-1]
            if len(self.leases):
                free = free[~np.isin(free, self.leases.indices())]
            if len(exclude):
                free = free[~np.isin(free, exclude)]
            need = count - len(picked)
            picked += free[:need].tolist()
            self.spare_top = int(free[need - 1]) if len(free) >= need else base
        return np.array(picked, dtype=np.int64)

    def reserve(
        self,
        client_id: str,
        indices: np.ndarray,
        state: np.ndarray,
        spares: int,
        frontier: int,
        ever_wanted: np.ndarray,
        rows_per_s: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decide what a trainer reads of its misses, and its spares; lease them to it.

        A trainer that asks for spares reads them while it waits for a unit (one whose
        reads compute asks for none: it would only take CPU from the preload). It then
        reads no more of its misses than its share (``beyond_share``); the rest turn
        ``HELD`` in ``state``, and the scheduler makes them the next unit. It gets spares
        when a unit holds one of its misses (it will wait) or it has no misses.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray
            Its misses.
        state : np.ndarray
            Their states so far (``READ_IT``, ``HELD``, ``STORED``); changed in place.
        spares : int
            Spare items asked for (0: none, and no share limit).
        frontier : int
            The first index no range unit has reached.
        ever_wanted : np.ndarray
            Indices left to the preload once: the trainer reads them itself if it
            misses them again, and none is a spare.
        rows_per_s : float
            How fast one preload slot read its last unit (0: not known yet).

        Returns
        -------
        tuple
            ``(later, picked)``: the misses left to the next unit, and the spares.
        """
        later = _EMPTY
        if spares:
            mine = (state == READ_IT) & (indices >= frontier)
            if len(ever_wanted):  # wanted once already (its read failed): the trainer's
                mine &= ~np.isin(indices, ever_wanted)
            positions = self.beyond_share(mine, frontier)
            state[positions] = HELD
            later = indices[positions]
        picked = _EMPTY
        if spares and ((state == HELD).any() or not len(indices)):
            # None of its own misses: a spare among them would be read, or given back, twice.
            picked = self.pick_spares(spares, frontier, np.union1d(ever_wanted, indices))
        self.hold(client_id, np.concatenate([indices[state == READ_IT], picked]), rows_per_s)
        return later, picked

    def hold(self, client_id: str, indices: np.ndarray, rows_per_s: float) -> None:
        """Lease ``indices`` to ``client_id`` for as long as reading them should take.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray
            What it will read.
        rows_per_s : float
            How fast one preload slot read its last unit (0: not known yet).
        """
        # One slot reads an item in threads_per_task / rows_per_s; so does the trainer.
        read_s = self.threads_per_task / rows_per_s if rows_per_s else 0.0
        self.leases.add(client_id, indices, RESERVE_LEASE_S + read_s * len(indices))

    def forget_stored(self) -> None:
        """Drop the leases on items that are cached by now."""
        if len(self.leases):
            self.leases.keep_only(self._missing(self.leases.indices()))

    def lapsed(self, failed: set[int]) -> np.ndarray:
        """Remove and return the leased items whose lease ended, but ``failed`` ones.

        Parameters
        ----------
        failed : set of int
            Indices the preload has already failed to read: not read again.

        Returns
        -------
        np.ndarray
            The indices, sorted.
        """
        ended = self.leases.take_expired()
        if failed and len(ended):
            ended = ended[~np.isin(ended, np.fromiter(failed, dtype=np.int64))]
        return ended
