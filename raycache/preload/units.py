"""Which indices each preload slot reads next: the units, and what trainers may reserve.

This is the preload's scheduler, run inside the directory actor. It calls no Ray: what
is cached comes from an injected ``missing`` callback, time from an injected clock, so
its rules can be tested alone. One lock (``UnitScheduler.lock``) covers every index set
below; the scheduler takes it, then ``missing`` takes the actor's lock, never the other
way round.

Guarantees:

- An index is in at most one unit handed out and not registered yet, and never in a unit
  while a trainer's lease on it is live: nothing is read twice that a reservation or a
  unit already covers.
- Wanted items (misses a trainer left to the preload) go out before the rest of the
  range; the range units then skip every index ever wanted, so a wanted item that fails
  is read, and reported, once.
- Items a trainer reserved and never stored (lease ended or released) are handed out
  after the range, except those the preload has already failed to read.
- ``inflight`` (first index -> end of each span being read) is replaced, never changed,
  so a copy taken without the lock is whole.

Units are sized for the run, not only for storage: a unit holds at most one chunk's worth
of items, and fewer as the run nears its end (a share of what is left, but no less than
``MIN_UNIT_S`` of reading at the last unit's pace), so the slots finish together and a
trainer that waits for an item being read waits for a short unit, while a fast provider
still fills whole chunks (fewer chunks: faster shuffled reads) unless its items are large
(no more than ``MIN_UNIT_BYTES``: a unit's chunk is sent whole, and the last send is all
tail). Where a floor's worth of items takes longer than ``MIN_UNIT_S`` to read (a slow
provider, known from a unit that came back), the floor gives way at the end to an even
split of what is left over the slots (but a read for each of a slot's threads and
``MIN_SPLIT_S`` of reading at least), so that one slot does not read the last items while
the others idle. When ``chunk_size`` is unset, the first units are probes of
``PROBE_ITEMS`` that tell how many bytes an item takes; the largest mean item size of any
unit so far sizes the next units, so items that grow along the dataset overfill only the
units sized before bigger items came back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from raycache.chunk import chunk_rows
from raycache.protocol import HELD, READ_IT, STORED
from raycache.reservations import ReservationPolicy

__all__ = [
    "MIN_SPLIT_S",
    "MIN_UNIT_BYTES",
    "MIN_UNIT_ITEMS",
    "MIN_UNIT_S",
    "PROBE_ITEMS",
    "UNITS_PER_SLOT",
    "ClaimedUnit",
    "UnitScheduler",
    "index_runs",
]

PROBE_ITEMS = 32  # first unit of each task slot when the chunk size is learned from bytes
MIN_UNIT_ITEMS = 64  # below this a unit's fixed cost (a call, a chunk) dominates
UNITS_PER_SLOT = 2  # a unit is at most 1 / (task slots * this) of what is left ...
MIN_UNIT_S = 0.05  # ... unless that would take less than this to read
MIN_UNIT_BYTES = 16 * 1024 * 1024  # ... or hold fewer bytes than this
MIN_SPLIT_S = 0.02  # a slow provider's last units: no less reading than this (a unit's cost)

_EMPTY = np.zeros(0, dtype=np.int64)


class ClaimedUnit(NamedTuple):
    """A unit handed out to a slot and not registered yet."""

    start: int  # the span of indices it was cut from (waiters go by the span)
    stop: int
    todo: np.ndarray  # the indices in the span it reads (not stored, not reserved)
    scattered: bool  # picked indices (wanted, leftover), not a range: waiters go by ``todo``


def index_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Return the ``(start, stop)`` runs of consecutive values in sorted ``indices``.

    Parameters
    ----------
    indices : np.ndarray
        Sorted, distinct indices.

    Returns
    -------
    list of tuple
        One half-open span per run of consecutive indices.
    """
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, stops)]


def _unit_floor(rows_per_s: float, item_bytes: float, threads_per_task: int, even: int) -> int:
    """Return the fewest rows the shrinking share cuts a unit to.

    Shrinking pays only where a unit takes long: a fast provider keeps full chunks
    (``MIN_UNIT_S`` of reading at the last unit's pace), but of large items no more than
    ``MIN_UNIT_BYTES`` (a unit's chunk is sent whole), and never less than a read per thread.
    A slow provider's floor (known only once a unit came back) gives way to ``even``, what
    is left per slot, so that one slot does not read the rest (seconds, perhaps) while the
    others idle; but no less than ``MIN_SPLIT_S`` of reading, a unit's own cost.
    """
    floor = max(MIN_UNIT_ITEMS, int(rows_per_s * MIN_UNIT_S))
    floor = min(floor, max(threads_per_task, int(MIN_UNIT_BYTES // max(1.0, item_bytes))))
    if 0 < rows_per_s * MIN_UNIT_S < floor:
        least = max(threads_per_task, math.ceil(rows_per_s * MIN_SPLIT_S))
        floor = min(floor, max(least, even))
    return floor


class UnitScheduler:
    """Hands out units to preload slots and takes them back; decides trainers' reservations.

    Parameters
    ----------
    length : int
        Number of provider items.
    tasks : int
        Preload slots (generator tasks) reading at once.
    threads : int
        ``preload_threads``: reads in flight over all slots.
    chunk_size : int or None
        Most items per unit; None: sized by bytes after the probe units.
    chunk_bytes : int
        Most bytes per unit.
    missing : Callable[[np.ndarray], np.ndarray]
        Returns the subset of indices not cached yet.
    clock : Callable[[], float]
        Monotonic seconds, for the reservations' leases.
    """

    def __init__(
        self,
        length: int,
        tasks: int,
        threads: int,
        chunk_size: int | None,
        chunk_bytes: int,
        missing: Callable[[np.ndarray], np.ndarray],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.length = length
        self.tasks = tasks
        self.threads_per_task = max(1, math.ceil(threads / tasks))
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.unit_rows: int | None = (
            None if chunk_size is None else chunk_rows(chunk_size, chunk_bytes, None)
        )
        self.lock = threading.Lock()
        self.stopped = threading.Event()  # set: hand out no more units, reserve nothing
        self.units = 0  # units handed out so far (the next unit's key)
        self.policy = ReservationPolicy(length, threads, self.threads_per_task, missing, clock)
        self.failed: set[int] = set()  # indices the preload failed to read: never again
        self.inflight: dict[int, int] = {}
        self._missing = missing
        self._item_bytes = 0.0  # largest mean item size of a unit so far
        self._rows_per_s = 0.0  # how fast a slot read its last unit
        self._next_start = 0  # the range's frontier: no range unit has reached past it
        self._claimed: dict[int, ClaimedUnit] = {}  # unit key -> unit, until registered
        self._claimed_items = 0  # items in ``_claimed``, readable without the lock
        self._leftover = _EMPTY  # reserved, never stored: read after the range
        # Misses a trainer asked for beyond its share of what is left: the next unit. The
        # range units leave out every index ever wanted (read, being read, or failed).
        self._wanted = _EMPTY
        self._ever_wanted = _EMPTY

    @property
    def frontier(self) -> int:
        """The first index no range unit has reached (range units are cut from here on)."""
        return self._next_start

    def items_left(self) -> int:
        """Return about how many items the preload still has to read (no lock taken).

        The range not reached yet, the units being read, wanted and leftover items; items
        trainers store meanwhile make this an overestimate.
        """
        ahead = max(0, self.length - self._next_start)
        return ahead + self._claimed_items + len(self._wanted) + len(self._leftover)

    def unit_size(self, remaining: int) -> int:
        """Return the rows of the next range unit when ``remaining`` indices are unreached.

        Parameters
        ----------
        remaining : int
            Indices from the frontier to the end of the range.

        Returns
        -------
        int
            The unit's span.
        """
        if self.unit_rows is None:
            return min(remaining, PROBE_ITEMS)
        share = math.ceil(remaining / (self.tasks * UNITS_PER_SLOT))
        even = math.ceil(remaining / self.tasks)
        floor = _unit_floor(self._rows_per_s, self._item_bytes, self.threads_per_task, even)
        return min(remaining, self.unit_rows, max(share, floor))

    def claim(self, done: tuple | None) -> tuple | None:
        """Hand a slot its next unit: ``(key, indices)``, or None when none is left.

        Parameters
        ----------
        done : tuple or None
            ``(rows, nbytes, seconds)`` of the slot's last finished unit, which sizes
            the next units (None before the slot's first).

        Returns
        -------
        tuple or None
            ``(key, indices)``: the unit's key (an int, which the slot reports back with
            its chunk) and the indices to read (an int64 array); None when no unit is
            left.
        """
        with self.lock:
            if done is not None and done[0]:
                self._learn(*done)
            self.policy.forget_stored()
            # A trainer waits for the wanted items: they go before the rest of the range.
            self._wanted, unit = self._hand_out_picked(self._wanted)
            if unit is not None:
                return unit
            unit = self._next_range_unit()
            if unit is not None:
                return unit
            if len(self.policy.leases):
                # Leases that ended: a trainer gave back spares it did not read (or a read
                # failed, or it died) after the units had passed them. The slots still
                # running read them now rather than a task started after the run.
                lapsed = self.policy.lapsed(self.failed)
                if len(lapsed) and self._claimed:  # one may be in a unit claimed since
                    held = np.concatenate([u.todo for u in self._claimed.values()])
                    lapsed = lapsed[~np.isin(lapsed, held)]
                self._leftover = np.union1d(self._leftover, lapsed)
            self._leftover, unit = self._hand_out_picked(self._leftover)
            return unit

    def _learn(self, rows: int, nbytes: int, seconds: float) -> None:
        self._rows_per_s = rows / max(seconds, 1e-3)
        # Items may differ in size: the largest unit mean so far sizes the next.
        self._item_bytes = max(self._item_bytes, nbytes / rows)
        self.unit_rows = chunk_rows(self.chunk_size, self.chunk_bytes, self._item_bytes)

    def _next_range_unit(self) -> tuple | None:
        """Cut the next range unit that has something to read, if any."""
        leases = self.policy.leases
        while not self.stopped.is_set() and self._next_start < self.length:
            start = self._next_start
            stop = start + self.unit_size(self.length - start)
            self._next_start = stop
            todo = self._missing(np.arange(start, stop))
            if len(leases) and len(todo):
                todo = todo[~np.isin(todo, leases.live(start, stop))]
            if len(self._ever_wanted) and len(todo):  # read (or being read) already
                todo = todo[~np.isin(todo, self._ever_wanted)]
            if len(todo):
                return self._hand_out(start, stop, todo)
        return None

    def _hand_out_picked(self, picked: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """Hand out the next unit of ``picked`` indices still missing, if any.

        Returns what is left of ``picked`` and the unit (``claim``'s reply), or None.
        """
        while not self.stopped.is_set() and len(picked):
            rows = self.unit_rows or PROBE_ITEMS
            todo = self._missing(picked[:rows])
            picked = picked[rows:]
            if len(todo):
                return picked, self._hand_out(int(todo[0]), int(todo[-1]) + 1, todo, True)
        return picked, None

    def _hand_out(self, start: int, stop: int, todo: np.ndarray, scattered: bool = False) -> tuple:
        key = self.units
        self.units += 1
        self._claimed[key] = ClaimedUnit(start, stop, todo, scattered)
        self._claimed_items += len(todo)
        self._publish_inflight()
        return key, todo

    def registered(self, key: int) -> None:
        """Give back unit ``key``: its slot reported it (stored, failed or discarded).

        Parameters
        ----------
        key : int
            The unit's key, as ``claim`` handed it out.
        """
        with self.lock:
            unit = self._claimed.pop(key, None)
            if unit is not None:
                self._claimed_items -= len(unit.todo)
            self._publish_inflight()

    def note_failed(self, indices: list[int]) -> None:
        """Record indices the preload failed to read: no lapsed lease hands them out again.

        Parameters
        ----------
        indices : list of int
            The failed indices.
        """
        with self.lock:
            self.failed.update(indices)

    def take_lost(self) -> list[np.ndarray]:
        """Give back every unit not registered (their slots ended); return their indices.

        No slot is left to read the wanted items either: their trainers read them (or a
        slot started for reserved items, which the range then leads to).
        """
        with self.lock:
            lost, self._claimed = self._claimed, {}
            self._claimed_items = 0
            self._ever_wanted = np.setdiff1d(self._ever_wanted, self._wanted)
            self._wanted = _EMPTY
            self._publish_inflight()
        return [unit.todo for unit in lost.values()]

    def settle_reserved(self) -> float | None:
        """Turn ended leases into leftover units; say how long to wait for the others.

        Returns
        -------
        float or None
            0.0 when there are leftover items to read now; the seconds until the next
            lease ends while leases are live; None when no item is reserved.
        """
        with self.lock:
            self.policy.forget_stored()
            ended = self.policy.lapsed(self.failed)
            if len(ended):
                self._leftover = ended
                return 0.0
            return self.policy.leases.next_end()

    def _publish_inflight(self) -> None:
        """Rebuild ``inflight`` from the units handed out and not registered yet.

        A range unit is waited for by its span; picked indices (a scattered unit, the
        wanted items no unit holds yet) by their runs, so that a trainer waits for none
        of the indices between them.
        """
        spans: dict[int, int] = {}
        runs = index_runs(self._wanted)
        for unit in self._claimed.values():
            runs += index_runs(unit.todo) if unit.scattered else [(unit.start, unit.stop)]
        for start, stop in runs:  # a leftover unit may share a start
            spans[start] = max(stop, spans.get(start, stop))
        self.inflight = spans

    def reserve(self, client_id: str, indices: np.ndarray, spares: int = 0) -> tuple:
        """Reserve for a trainer the ``indices`` no unit holds, and maybe spare items.

        The units claimed from now on leave reserved items out: the trainer reads them.
        What it may reserve (its share, spares) is ``ReservationPolicy.reserve``'s call;
        the misses beyond its share become wanted items, the next unit.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray
            Indices the trainer misses (not cached as far as it knows).
        spares : int
            Spare items to ask for (see ``ReservationPolicy.reserve``).

        Returns
        -------
        tuple
            ``(state, spare_indices)``: per index of ``indices``, ``READ_IT`` (reserved
            for the trainer), ``HELD`` (a unit holds it: wait for it instead of reading
            it) or ``STORED`` (cached since the trainer last looked); and the spares
            reserved.
        """
        with self.lock:
            state = np.full(len(indices), READ_IT, dtype=np.int8)
            for unit in self._claimed.values():
                state[np.isin(indices, unit.todo)] = HELD
            # A unit registered since the trainer's last sync: reading it would be a copy more.
            state[~np.isin(indices, self._missing(indices))] = STORED
            if self.stopped.is_set():
                return state, _EMPTY
            if len(self._wanted):  # another batch's misses, the next unit's
                state[(state == READ_IT) & np.isin(indices, self._wanted)] = HELD
            frontier, ever = self._next_start, self._ever_wanted
            later, picked = self.policy.reserve(
                client_id, indices, state, spares, frontier, ever, self._rows_per_s
            )
            if len(later):
                self._wanted = np.union1d(self._wanted, later)
                self._ever_wanted = np.union1d(self._ever_wanted, later)
                self._publish_inflight()
            return state, picked

    def release(self, client_id: str, indices: np.ndarray | None = None) -> None:
        """End ``client_id``'s reservations (on ``indices``, or all): the preload reads them.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray, optional
            The reserved indices it will not read after all; None: all of its own.
        """
        with self.lock:
            self.policy.leases.release(client_id, indices)
