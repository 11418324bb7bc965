"""Preloading: Ray tasks read provider items into chunks that the cache owns.

The directory actor starts one generator task per slot. Each task asks the actor for a
range of indices (a unit) at a time, reads it with a few threads and yields its chunk;
the actor registers each chunk as it arrives and owns what the tasks yield, so the
chunks outlive the trainer that asked for the preload. Several tasks run at once
(CPU-bound providers need every core, which threads in one trainer process cannot give)
and each keeps a few reads in flight (I/O-bound providers need many).
``preload_threads`` bounds the reads in flight over all tasks together, the meaning
Hyrax gives the knob.

A task claims its next unit and queues its reads before the current unit is done (when
about two reads per thread of the current unit are left to start), so its threads go
straight on while the finished unit is packed and sent. Tasks that read
one unit each (the design before 2026-12-01) left their slot idle at every unit's end
while the chunk was stacked and stored, the actor saw the result and the next task was
leased: the tail of a preload took ~1.6x as long as its reads.

Units are sized for the run, not only for storage: a unit holds at most one chunk's
worth of items, and fewer as the run nears its end (each is a share of what is left,
but not less than ~0.05 s of reading at the last unit's pace), so that the tasks finish
together and a trainer that needs an item being read waits for a short unit, while a
fast provider still fills whole chunks (fewer chunks: faster shuffled reads).

When ``chunk_size`` is unset, the first units (two per slot: each claims one ahead)
are small probes that tell how many bytes an item takes; the largest mean item size of
any unit read so far sizes the next units, so items that grow along the dataset
overfill only the units sized before a unit of bigger items came back.

Items a trainer reads itself meanwhile (its batches' misses no unit holds, spare items
while it waits for a unit) are reserved for it first, and the units leave them out; what
a trainer reserved and never stored is read after the other units (``raycache.reservations``).

Reader processes kept as actors for the run and killed after it (which returns the
memory a provider costs a process) were tried and measured slower: starting an actor
took ~1 s here, longer than a whole preload of the benchmarks (docs/design.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import ray

from raycache.chunk import Chunk, chunk_rows, flatten_checked
from raycache.chunk_builder import ChunkBuilder, ColumnSpares, release_heap
from raycache.protocol import HELD, READ_IT, STORED
from raycache.provider import load_provider, read_raw
from raycache.readers import ReaderThreads, UnitReads
from raycache.reservations import Reservations

__all__ = ["PreloadRun", "read_units", "read_units_task"]

logger = logging.getLogger(__name__)

PROBE_ITEMS = 32  # first unit of each task slot when the chunk size is learned from bytes
MIN_UNIT_ITEMS = 64  # below this a unit's fixed cost (a call, a chunk) dominates
UNITS_PER_SLOT = 2  # a unit is at most 1 / (task slots * this) of what is left ...
MIN_UNIT_S = 0.05  # ... unless that would take less than this to read
STARTUP_WARNING_S = 30.0  # no unit back after this long: say why it may be stuck
# A trainer's reservation lasts its reads' expected time plus this: time to insert them and
# for the insert to reach the actor (flush_interval_s, 0.1 s by default), with a margin for
# a loaded machine. Only a trainer that dies or fails a read makes the preload wait it out.
RESERVE_LEASE_S = 5.0
SPARE_SCAN = 1024  # indices scanned at a time for spare items to hand out
RESERVED_POLL_S = 0.02  # how often the end of a run looks for reserved items being stored


def _read_into(provider: Any, idx: int, pos: int, builder: ChunkBuilder) -> str | None:
    """Read item ``idx`` into row ``pos`` of its unit's chunk; the error, if any."""
    try:
        item = read_raw(provider, idx)
        leaves: list = []
        template = flatten_checked(item, leaves)  # validates; the builder copies the arrays
        builder.add(pos, item, (template, leaves))
        return None
    except Exception as exc:  # reported with its index; the other items go on
        return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _build_chunk(
    indices: np.ndarray, results: list, builder: ChunkBuilder, start: float
) -> tuple[Chunk, dict]:
    """Finish one unit's chunk and the summary the actor reads."""
    failed = [p for p, err in enumerate(results) if err is not None]
    errors = [(int(indices[p]), results[p]) for p in failed]
    good = np.flatnonzero(np.array([err is None for err in results], dtype=bool))
    try:
        chunk = builder.build(indices[good], good)
    except Exception as exc:  # items that cannot share a chunk: report, do not hang
        detail = f"{type(exc).__name__}: {exc}"
        errors += [(int(indices[p]), detail) for p in good]
        chunk = Chunk.from_rows([], [])
    summary = {
        "indices": chunk.indices,
        "nbytes": chunk.nbytes,
        "errors": errors,
        "seconds": time.monotonic() - start,
    }
    return chunk, summary


def read_units(
    provider: Any,
    claim: Callable[[tuple | None], tuple | None],
    threads: int,
    reuse_columns: bool = False,
) -> Iterator[Chunk | dict]:
    """Read the units ``claim`` hands out, yielding a chunk and its summary for each.

    The next unit is claimed and its reads queued once the current one is draining
    (``raycache.readers.DRAIN_LEAD_READS`` reads per thread left to start), so the
    reader threads never wait at a unit's end: they go on with the next unit while the
    finished one is packed into a chunk and sent. Claiming it no earlier leaves its
    indices to trainers (spares, misses) for as long as possible.

    Parameters
    ----------
    provider : Any
        The provider.
    claim : Callable
        Called with ``(rows, nbytes, seconds)`` of the last finished unit (None before
        one has finished); returns ``(key, indices)`` of the next unit, or None when there
        is no more work.
    threads : int
        Reads in flight at once.
    reuse_columns : bool
        Fill later units into the arrays of chunks already yielded (see
        ``ColumnSpares``). Only for a consumer that copies each chunk before it asks
        for the next value, as Ray does with what a generator task yields.

    Yields
    ------
    Chunk or dict
        For each unit, its chunk, then its summary ``{"unit", "indices", "nbytes",
        "errors", "seconds"}`` (``unit``: its key), which the directory actor reads
        without the chunk.
    """
    spares = ColumnSpares() if reuse_columns else None

    def read(unit: UnitReads, pos: int) -> str | None:
        return _read_into(provider, unit.indices[pos], pos, unit.builder)

    with ReaderThreads(read, threads) as readers:

        def queue(claimed: tuple | None) -> UnitReads | None:
            if claimed is None:
                return None
            key, indices = claimed
            indices = np.asarray(indices, dtype=np.int64)
            unit = UnitReads(key, indices.tolist(), ChunkBuilder(len(indices), spares))
            return readers.queue(unit)

        current = queue(claim(None))
        done = None  # (rows, nbytes, seconds) of the last unit finished
        began = time.monotonic()
        while current is not None:
            # The next unit is claimed when the current one drains: late enough that the
            # indices it takes stay free for trainers until then, early enough that the
            # claim's round trip ends before the threads run out of reads.
            current.draining.wait()
            upcoming = queue(claim(done))
            current.done.wait()
            indices = np.asarray(current.indices, dtype=np.int64)
            chunk, summary = _build_chunk(indices, current.results, current.builder, began)
            began = time.monotonic()  # the next unit's reads run from here on
            summary["unit"] = current.key
            done = (len(summary["indices"]), summary["nbytes"], summary["seconds"])
            yield chunk  # Ray has copied the chunk into the object store when this returns
            del chunk
            if spares is not None:
                spares.give(current.builder.buffers)
            yield summary
            current = upcoming
    # Reader threads allocated the items in their own malloc arenas, whose freed pages
    # glibc keeps resident: give them back, and the spare columns, once the slot is done.
    if spares is not None:
        spares.clear()
    release_heap()


@ray.remote(max_retries=0)
def read_units_task(
    provider_blob: bytes, provider_key: str, directory: Any, threads: int
) -> Iterator[Chunk | dict]:
    """Ray generator task: one preload slot, reading units until none is left.

    Parameters
    ----------
    provider_blob : bytes
        The pickled provider.
    provider_key : str
        Identifies the preload run (see ``raycache.provider.load_provider``).
    directory : ray.actor.ActorHandle
        The cache's directory actor, which hands out the units (``preload_claim``).
    threads : int
        Reads in flight at once.

    Yields
    ------
    Chunk or dict
        See ``read_units``. The directory actor owns what is yielded.
    """
    provider = load_provider(provider_key, provider_blob)

    def claim(done: tuple | None) -> tuple | None:
        return ray.get(directory.preload_claim.remote(provider_key, done))

    # Ray copies each yielded chunk into the object store before the generator resumes.
    yield from read_units(provider, claim, threads, reuse_columns=True)


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


class PreloadRun:
    """One preload of a cache, driven by a thread inside the directory actor.

    ``tasks`` generator tasks (one per slot) each read units that ``claim`` hands out
    and yield a chunk per unit; the driving thread registers each chunk as it comes.

    Parameters
    ----------
    length : int
        Number of provider items.
    provider_blob : bytes
        The pickled provider.
    threads : int
        ``preload_threads``: reads in flight over all tasks.
    chunk_size : int or None
        ``raycache.chunk_size``: most items per unit (and chunk); None: by bytes.
    chunk_bytes : int
        ``raycache.chunk_bytes``: most bytes per unit (and chunk).
    cpus_per_task : float
        ``raycache.preload_cpus``: CPUs each task reserves.
    directory : ray.actor.ActorHandle
        The directory actor, whose ``preload_claim`` the tasks call (it calls ``claim``).
    missing : Callable[[np.ndarray], np.ndarray]
        Returns the subset of indices not cached yet (called under the actor's lock).
    add_chunk : Callable[[ray.ObjectRef, dict], bool]
        Registers a finished chunk; returns False when the byte budget is full.
    on_progress : Callable[[int, float], None], optional
        Called with the item count and seconds of each finished unit.
    """

    def __init__(
        self,
        length: int,
        provider_blob: bytes,
        threads: int,
        chunk_size: int | None,
        chunk_bytes: int,
        cpus_per_task: float,
        directory: Any,
        missing: Callable[[np.ndarray], np.ndarray],
        add_chunk: Callable[[Any, dict], bool],
        on_progress: Callable[[int, float], None] | None = None,
    ):
        self.length = length
        self.threads = threads
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.cpus_per_task = float(cpus_per_task)
        # Total, not available, CPUs: tasks that just finished may still be counted as busy.
        cpus = max(1, math.ceil(ray.cluster_resources().get("CPU", 1)))
        self.tasks = max(1, min(threads, cpus, math.ceil(length / MIN_UNIT_ITEMS)))
        self.threads_per_task = max(1, math.ceil(threads / self.tasks))
        # Rows per unit: known up front from chunk_size, else after the first unit.
        self.unit_rows: int | None = (
            None if chunk_size is None else chunk_rows(chunk_size, chunk_bytes, None)
        )
        self._blob_ref = ray.put(provider_blob)
        self.key = uuid.uuid4().hex
        self._directory = directory
        self._missing = missing
        self._add_chunk = add_chunk
        self._on_progress = on_progress
        self.state = "running"
        self.errors: list[dict] = []
        self.loaded = 0
        self.units = 0
        self._item_bytes = 0.0  # largest mean item size of a unit so far
        self._rows_per_s = 0.0  # how fast a slot read its last unit
        self._next_start = 0
        self._claim_lock = threading.Lock()
        self._claimed: dict[int, ClaimedUnit] = {}  # unit key -> unit, until registered
        self._reserved = Reservations()  # items trainers are reading themselves
        self._leftover = np.zeros(0, dtype=np.int64)  # reserved, never stored: read last
        # Misses a trainer asked for beyond its share of what is left: the next unit. The
        # range units leave out every index ever wanted (read, being read, or failed).
        self._wanted = np.zeros(0, dtype=np.int64)
        self._ever_wanted = np.zeros(0, dtype=np.int64)
        self._spare_top = length  # spare items are handed out from the top down
        self.started = time.time()
        self.finished: float | None = None
        # First index -> end of each span units being read cover, for trainers to wait on;
        # replaced, never changed, so that a copy taken without the claim lock is whole.
        self.inflight: dict[int, int] = {}
        self.done_event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycache-preload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Hand out no more units; units being read finish and are discarded."""
        self._stop.set()

    def is_reading(self, idx: int) -> bool:
        """Return True if ``idx`` belongs to a unit handed out and not registered yet."""
        return any(start <= idx < stop for start, stop in list(self.inflight.items()))

    def status(self) -> dict:
        """Return the run's progress, errors and timing."""
        end = self.finished or time.time()
        return {
            "state": self.state,
            "loaded": self.loaded,
            "errors": list(self.errors),
            "tasks": self.tasks,
            "threads_per_task": self.threads_per_task,
            "units": self.units,
            "reserved": self._reserved.live_count() if self.finished is None else 0,
            "seconds": end - self.started,
        }

    def _run(self) -> None:
        try:
            self._drive()
            self.state = "done" if not self.errors else "done_with_errors"
        except Exception:  # the actor must learn of it; never leave waiters hanging
            logger.exception("raycache preload failed")
            self.errors.append({"index": None, "error": traceback.format_exc(limit=3)})
            self.state = "failed"
        finally:
            self.inflight = {}
            self.finished = time.time()
            self.done_event.set()

    def _unit_size(self, remaining: int) -> int:
        if self.unit_rows is None:
            return min(remaining, PROBE_ITEMS)
        share = math.ceil(remaining / (self.tasks * UNITS_PER_SLOT))
        # Shrinking pays only where a unit takes long: a fast provider keeps full chunks.
        floor = max(MIN_UNIT_ITEMS, int(self._rows_per_s * MIN_UNIT_S))
        return min(remaining, self.unit_rows, max(share, floor))

    def claim(self, done: tuple | None) -> tuple | None:
        """Hand a slot its next unit: ``(start, indices)``, or None when none is left.

        Parameters
        ----------
        done : tuple or None
            ``(rows, nbytes, seconds)`` of the slot's last finished unit, which sizes
            the next units (None before the slot's first).

        Returns
        -------
        tuple or None
            The unit's key (which the slot reports back with its chunk) and the indices
            to read.
        """
        with self._claim_lock:
            if done is not None and done[0]:
                rows, nbytes, seconds = done
                self._rows_per_s = rows / max(seconds, 1e-3)
                # Items may differ in size: the largest unit mean so far sizes the next.
                self._item_bytes = max(self._item_bytes, nbytes / rows)
                self.unit_rows = chunk_rows(self.chunk_size, self.chunk_bytes, self._item_bytes)
            if len(self._reserved):  # forget reservations whose items are stored
                self._reserved.keep_only(self._missing(self._reserved.indices()))
            # A trainer waits for the wanted items: they go before the rest of the range.
            self._wanted, unit = self._hand_out_picked(self._wanted)
            if unit is not None:
                return unit
            while not self._stop.is_set() and self._next_start < self.length:
                start = self._next_start
                stop = start + self._unit_size(self.length - start)
                self._next_start = stop
                todo = self._missing(np.arange(start, stop))
                if len(self._reserved) and len(todo):
                    todo = todo[~np.isin(todo, self._reserved.live(start, stop))]
                if len(self._ever_wanted) and len(todo):  # read (or being read) already
                    todo = todo[~np.isin(todo, self._ever_wanted)]
                if len(todo):
                    return self._hand_out(start, stop, todo)
            if len(self._reserved):
                # Leases that ended: a trainer gave back spares it did not read (or a read
                # failed, or it died) after the units had passed them. The slots still
                # running read them now rather than a task started after the run.
                lapsed = self._lapsed()
                if len(lapsed) and self._claimed:  # one may be in a unit claimed since
                    held = np.concatenate([u.todo for u in self._claimed.values()])
                    lapsed = lapsed[~np.isin(lapsed, held)]
                self._leftover = np.union1d(self._leftover, lapsed)
            self._leftover, unit = self._hand_out_picked(self._leftover)
            return unit

    def _hand_out_picked(self, picked: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """Hand out the next unit of ``picked`` indices still missing, if any.

        Returns what is left of ``picked`` and the unit (``claim``'s reply), or None.
        """
        while not self._stop.is_set() and len(picked):
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
        self._publish_inflight()
        return key, todo

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

    def _lapsed(self) -> np.ndarray:
        """Remove and return the reserved items whose lease ended, but failed ones."""
        ended = self._reserved.take_expired()
        failed = [e["index"] for e in self.errors if e["index"] is not None]
        return ended[~np.isin(ended, failed)] if failed else ended

    def reserve(self, client_id: str, indices: np.ndarray, spares: int = 0) -> tuple:
        """Reserve for a trainer the ``indices`` no unit holds, and maybe spare items.

        The units claimed from now on leave reserved items out: the trainer reads them.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray
            Indices the trainer misses (not cached as far as it knows).
        spares : int
            Spare items to reserve as well, from the top of the indices no unit has
            reached, when a unit holds one of ``indices`` (the trainer will wait for it,
            reading spares meanwhile) or ``indices`` is empty. A trainer that asks for
            spares reserves no more of ``indices`` than its share of what is left; the
            rest are HELD, the next unit a slot claims.

        Returns
        -------
        tuple
            ``(state, spare_indices)``: per index of ``indices``, ``READ_IT`` (reserved
            for the trainer), ``HELD`` (a unit holds it: wait for it instead of reading
            it) or ``STORED`` (cached since the trainer last looked); and the spares
            reserved.
        """
        with self._claim_lock:
            state = np.full(len(indices), READ_IT, dtype=np.int8)
            for unit in self._claimed.values():
                state[np.isin(indices, unit.todo)] = HELD
            # A unit registered since the trainer's last sync: reading it would be a copy more.
            state[~np.isin(indices, self._missing(indices))] = STORED
            picked = np.zeros(0, dtype=np.int64)
            if self._stop.is_set():
                return state, picked
            if len(self._wanted):  # another batch's misses, the next unit's
                state[(state == READ_IT) & np.isin(indices, self._wanted)] = HELD
            if spares:  # it reads spares while it waits (one whose reads compute would idle)
                self._defer_beyond_share(indices, state)
            if spares and ((state == HELD).any() or not len(indices)):
                picked = self._pick_spares(spares)
            mine = np.concatenate([indices[state == READ_IT], picked])
            # One slot reads an item in threads_per_task / rows_per_s; so does the trainer.
            read_s = self.threads_per_task / self._rows_per_s if self._rows_per_s else 0.0
            self._reserved.add(client_id, mine, RESERVE_LEASE_S + read_s * len(mine))
            return state, picked

    def _defer_beyond_share(self, indices: np.ndarray, state: np.ndarray) -> None:
        """Make the misses beyond a trainer's share of what is left the next unit (HELD).

        A trainer reads its misses one at a time. When they are more than its share of
        what no unit has reached (near the end of a run, or any time in a small one),
        reading them all would outlast the preload's threads, which then idle: 64
        misses of 2 ms are 0.13 s, when a preload of 256 such items took 0.1 s. Only for
        a trainer that asks for spares, which it reads while it waits.
        """
        mine = (state == READ_IT) & (indices >= self._next_start)
        if len(self._ever_wanted):  # wanted once already (its read failed): the trainer's
            mine &= ~np.isin(indices, self._ever_wanted)
        mine = np.flatnonzero(mine)
        left = max(0, self._spare_top - self._next_start)
        # As many as a slot's threads read meanwhile, or the share of what is left.
        share = max(1, left // (self.threads + 1), -(-len(mine) // (self.threads_per_task + 1)))
        if len(mine) <= share:
            return
        later = mine[share:]
        state[later] = HELD
        self._wanted = np.union1d(self._wanted, indices[later])
        self._ever_wanted = np.union1d(self._ever_wanted, indices[later])
        self._publish_inflight()

    def _pick_spares(self, count: int) -> np.ndarray:
        """Return up to ``count`` indices no unit has reached, nor anyone stored or reserved."""
        # A trainer's share of what no unit has reached (it reads about as fast as one of
        # the preload's threads): near the end, spares beyond that would mostly be given
        # back unread, after units claimed meanwhile had left them out.
        count = min(count, max(1, (self._spare_top - self._next_start) // (self.threads + 1)))
        picked: list[int] = []
        while len(picked) < count and self._spare_top > self._next_start:
            base = max(self._next_start, self._spare_top - SPARE_SCAN)
            free = self._missing(np.arange(base, self._spare_top))[::-1]
            if len(self._reserved):
                free = free[~np.isin(free, self._reserved.indices())]
            if len(self._ever_wanted):
                free = free[~np.isin(free, self._ever_wanted)]
            need = count - len(picked)
            picked += free[:need].tolist()
            self._spare_top = int(free[need - 1]) if len(free) >= need else base
        return np.array(picked, dtype=np.int64)

    def release(self, client_id: str, indices: np.ndarray | None = None) -> None:
        """End ``client_id``'s reservations (on ``indices``, or all): the preload reads them.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray, optional
            The reserved indices it will not read after all; None: all of its own.
        """
        with self._claim_lock:
            self._reserved.release(client_id, indices)

    def _drive(self) -> None:
        task = read_units_task.options(num_cpus=self.cpus_per_task)
        slots = [
            task.remote(self._blob_ref, self.key, self._directory, self.threads_per_task)
            for _ in range(self.tasks)
        ]
        while True:
            self._wait_for_slots(slots)
            # Units handed out but never reported: their slot's task died.
            with self._claim_lock:
                lost, self._claimed = self._claimed, {}
                # No slot is left to read the wanted items: their trainers read them (or
                # a task started for reserved items, which the range then leads to).
                self._ever_wanted = np.setdiff1d(self._ever_wanted, self._wanted)
                self._wanted = np.zeros(0, dtype=np.int64)
                self._publish_inflight()
            for unit in lost.values():
                self._lost_unit(unit.todo, "the preload task reading it ended early")
            if not self._await_reserved():
                break
            # Items reserved by a trainer that did not store them: one slot reads them.
            slots = [task.remote(self._blob_ref, self.key, self._directory, self.threads_per_task)]

    def _wait_for_slots(self, slots: list) -> None:
        """Register what the slots yield until every slot has ended."""
        last_news = time.monotonic()
        warned = False
        while slots:
            ready, _ = ray.wait(slots, num_returns=1, timeout=1.0)
            if not ready and not warned and time.monotonic() - last_news > STARTUP_WARNING_S:
                warned = True
                logger.warning(
                    "raycache preload: no unit finished in %.0f s; if trainers hold every "
                    "CPU, the preload tasks (raycache.preload_cpus=%g each) cannot start",
                    STARTUP_WARNING_S,
                    self.cpus_per_task,
                )
            for slot in ready:
                last_news = time.monotonic()
                if not self._take(slot):
                    slots.remove(slot)

    def _await_reserved(self) -> bool:
        """Wait for the items trainers reserved to be stored; True if some never will be.

        Those (their lease ended, or their client released them) become the units that
        ``claim`` hands out last, but for items the preload has already failed to read.
        """
        while not self._stop.is_set():
            with self._claim_lock:
                self._reserved.keep_only(self._missing(self._reserved.indices()))
                ended = self._lapsed()
                if len(ended):
                    self._leftover = ended
                    return True
                left = self._reserved.next_end()
            if left is None:
                return False
            self._stop.wait(min(left, RESERVED_POLL_S))
        return False

    def _take(self, slot: Any) -> bool:
        """Register the next unit a slot yielded; False once the slot has ended."""
        try:
            chunk_ref = next(slot)
        except StopIteration:
            return False
        try:
            summary = ray.get(next(slot))
        except Exception as exc:  # the task died (worker crash, out of memory, cancelled)
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.error("raycache preload task failed: %s", detail)
            return False  # its units are reported when the run ends
        if not self._finish(chunk_ref, summary):
            self._stop.set()  # the byte budget is full: hand out no more units
        with self._claim_lock:
            self._claimed.pop(summary["unit"], None)
            self._publish_inflight()
        return True

    def _lost_unit(self, todo: np.ndarray, detail: str) -> None:
        logger.error(
            "raycache preload could not read indices %d..%d (%d items): %s",
            todo[0],
            todo[-1],
            len(todo),
            detail,
        )
        self.errors += [{"index": int(i), "error": detail} for i in todo]

    def _finish(self, chunk_ref: Any, summary: dict) -> bool:
        """Record one unit's result; False once the byte budget is full."""
        for idx, detail in summary["errors"]:
            logger.error("raycache preload could not read index %s: %s", idx, detail)
            self.errors.append({"index": idx, "error": detail})
        count = len(summary["indices"])
        if not count or self._stop.is_set():
            return True
        room = self._add_chunk(chunk_ref, summary)
        self.loaded += count
        if self._on_progress is not None:
            self._on_progress(count, summary["seconds"])
        return room
