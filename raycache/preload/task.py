"""The preload's worker side: a Ray generator task reads units of items into chunks.

This module runs in Ray worker processes. Each task (one preload slot) asks the
directory actor for a unit of indices at a time (``preload_claim``), reads it with a few
threads (``raycache.preload.readers``) and yields its chunk, then a summary the actor
reads without the chunk. The actor owns what the task yields, so the chunks outlive the
trainer that asked for the preload. Several tasks run at once (a CPU-bound provider
needs every core, which threads in one process cannot give) and each keeps a few reads
in flight (an I/O-bound provider needs many).

A task claims its next unit and queues its reads while the current unit drains (about
two reads per thread left to start), so its threads go straight on while the finished
unit is packed and sent, and the claimed indices stay free for trainers until then. When
the units queued behind are draining too by the time a chunk is packed (sending it into
fresh store pages can outlast a unit's reads), one more is claimed before the send.

The pickled provider reaches a task as an ObjectRef inside a one-item list, which the
task empties as soon as it has the bytes (``load_boxed_provider``). The raylet pins a
task's top-level ObjectRef arguments (and arguments large enough to be stored) for as
long as the task's worker is leased, and when the owner (the directory actor) dies it
kills that worker without unpinning them (ray-project/ray#64627): each actor killed or
dropped during a preload left its provider blob in the object store until Ray stopped,
even under memory pressure. A ref inside a list is no pinned argument; the task
borrows it only until it drops it.

The read path does one provider read, one flatten-and-check and one copy into the
unit's columns per item; everything else is per unit.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk, flatten_checked
from raycache.chunk_builder import ChunkBuilder, ColumnSpares, release_heap
from raycache.preload.profile import UnitTimes
from raycache.preload.readers import ReaderThreads, UnitReads
from raycache.provider import load_provider, read_raw

__all__ = [
    "BLOB_GET_TIMEOUT_S",
    "CLAIM_TIMEOUT_S",
    "load_boxed_provider",
    "read_units",
    "read_units_task",
]

BLOB_GET_TIMEOUT_S = 120.0  # the blob is in the object store already; this bounds a stall
# A claim is a short call under the actor's lock; this long only if the actor is stuck.
# The task then fails, and the run reports the unit it was reading as lost.
CLAIM_TIMEOUT_S = 300.0


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


def _build_chunk(unit: UnitReads, start: float) -> tuple[Chunk, dict]:
    """Finish one unit's chunk and the summary the actor reads."""
    indices = np.asarray(unit.indices, dtype=np.int64)
    results = unit.results
    errors = [(int(indices[p]), err) for p, err in enumerate(results) if err is not None]
    good = np.flatnonzero(np.array([err is None for err in results], dtype=bool))
    try:
        chunk = unit.builder.build(indices[good], good)
    except Exception as exc:  # items that cannot share a chunk: report, do not hang
        detail = f"{type(exc).__name__}: {exc}"
        errors += [(int(indices[p]), detail) for p in good]
        chunk = Chunk.from_rows([], [])
    summary = {
        "unit": unit.key,
        "indices": chunk.indices,
        "nbytes": chunk.nbytes,
        "errors": errors,
        "seconds": time.monotonic() - start,
    }
    return chunk, summary


class _UnitQueue:
    """Turns what ``claim`` hands out into units queued on the reader threads.

    ``ahead`` holds the units queued behind the one the slot finishes next. One more is
    claimed only when the last of them drains (``top_up``), so a slot holds the indices
    of a unit no earlier than its threads are about to need them.
    """

    def __init__(
        self,
        readers: ReaderThreads,
        spares: ColumnSpares | None,
        claim: Callable[[tuple | None], tuple | None],
        times: UnitTimes,
    ):
        self._readers = readers
        self._spares = spares
        self._claim = claim
        self._times = times
        self.ahead: deque[UnitReads] = deque()
        self._exhausted = False

    def claim_next(self, done: tuple | None) -> None:
        """Claim a unit and queue its reads; nothing once ``claim`` said none is left."""
        if self._exhausted:
            return
        began = time.monotonic()
        claimed = self._claim(done)
        self._times.add("claim_s", began)
        if claimed is None:
            self._exhausted = True
            return
        key, indices = claimed
        indices = np.asarray(indices, dtype=np.int64)
        builder = ChunkBuilder(len(indices), self._spares, private=True)
        self.ahead.append(self._readers.queue(UnitReads(key, indices.tolist(), builder)))

    def top_up(self, current: UnitReads, done: tuple | None) -> None:
        """Claim one more unit if the last one queued (or ``current``) is draining."""
        last = self.ahead[-1] if self.ahead else current
        if last.draining.is_set():
            self.claim_next(done)

    def take(self) -> UnitReads | None:
        """Return the next unit to finish, if any."""
        return self.ahead.popleft() if self.ahead else None


def _stream_units(
    readers: ReaderThreads,
    claim: Callable[[tuple | None], tuple | None],
    spares: ColumnSpares | None,
    item_timeout: float | None,
    times: UnitTimes,
) -> Iterator[Chunk | dict]:
    """Claim units, queue their reads and yield each finished chunk and its summary."""
    units = _UnitQueue(readers, spares, claim, times)
    units.claim_next(None)
    current = units.take()
    done = None  # (rows, nbytes, seconds) of the last unit finished
    began = now = time.monotonic()
    while current is not None:
        # The next unit is claimed when the current one drains: late enough that the
        # indices it takes stay free for trainers until then, early enough that the
        # claim's round trip ends before the threads run out of reads.
        readers.wait(current.draining, item_timeout)
        now = times.add("wait_s", now)
        units.top_up(current, done)
        now = time.monotonic()
        readers.wait(current.done, item_timeout)
        now = times.add("wait_s", now)
        chunk, summary = _build_chunk(current, began)
        began = now = times.add("build_s", now)  # the next unit's reads run from here on
        done = (len(summary["indices"]), summary["nbytes"], summary["seconds"])
        # Sending the chunk can outlast the reads queued behind it (a copy into fresh
        # store pages): if they drain meanwhile, the threads would idle until the claim
        # after the send came back. Claim the unit after them now instead.
        units.top_up(current, done)
        now = time.monotonic()
        yield chunk  # Ray has copied the chunk into the object store when this returns
        del chunk
        # A read given up on may still write its row later: its columns are not reused.
        if spares is not None and not current.timed_out:
            spares.give(current.builder.buffers)
        now = times.add("put_s", now)
        summary["times"] = times.take()
        yield summary
        now = time.monotonic()  # the actor's reading of the summary is not the slot's
        current = units.take()


def read_units(
    provider: Any,
    claim: Callable[[tuple | None], tuple | None],
    threads: int,
    reuse_columns: bool = False,
    item_timeout: float | None = None,
    began: float | None = None,
) -> Iterator[Chunk | dict]:
    """Read the units ``claim`` hands out, yielding a chunk and its summary for each.

    The next unit is claimed once the current one drains (see the module docstring).

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
    item_timeout : float, optional
        Seconds a read may take before the unit goes on without it; None: no limit.
    began : float, optional
        ``time.time()`` when the slot's task started; sent with the first unit's times.

    Yields
    ------
    Chunk or dict
        For each unit, its chunk, then its summary ``{"unit", "indices", "nbytes",
        "errors", "seconds", "times"}`` (``unit``: its key; ``times``: where the slot's
        time went since the last summary, ``raycache.preload.profile.UnitTimes``),
        which the directory actor reads without the chunk.
    """
    spares = ColumnSpares() if reuse_columns else None

    def read(unit: UnitReads, pos: int) -> str | None:
        return _read_into(provider, unit.indices[pos], pos, unit.builder)

    with ReaderThreads(read, threads) as readers:
        times = UnitTimes(began=began)
        yield from _stream_units(readers, claim, spares, item_timeout, times)
    # Reader threads allocated the items in their own malloc arenas, whose freed pages
    # glibc keeps resident: give them back, and the spare columns, once the slot is done.
    if spares is not None:
        spares.clear()
    release_heap()


def unbox(box: list) -> Any:
    """Get the object whose ref ``box`` holds, and let go of the ref at once.

    Parameters
    ----------
    box : list
        A one-item list holding an ObjectRef; emptied here, so that the task borrows the
        ref only while it reads it (see the module docstring).

    Returns
    -------
    Any
        The object.

    Raises
    ------
    ValueError
        If ``box`` is not a one-item list of an ObjectRef.
    """
    if not (isinstance(box, list) and len(box) == 1 and isinstance(box[0], ray.ObjectRef)):
        size = len(box) if isinstance(box, list) else "-"
        raise ValueError(
            f"expected a one-item list holding an ObjectRef, got {type(box).__name__} "
            f"(length {size}); pass [ray.put(value)]"
        )
    ref = box.pop()
    try:
        return ray.get(ref, timeout=BLOB_GET_TIMEOUT_S)
    finally:
        del ref  # the borrow ends here, not when the task ends


def load_boxed_provider(provider_key: str, provider_box: list) -> Any:
    """Load the provider whose pickle ``provider_box`` holds, and let go of the ref at once.

    Parameters
    ----------
    provider_key : str
        Identifies the preload run (see ``raycache.provider.load_provider``).
    provider_box : list
        ``[ray.put(provider_blob)]`` (see ``unbox``).

    Returns
    -------
    Any
        The provider.

    Raises
    ------
    ValueError
        If ``provider_box`` is not a one-item list of an ObjectRef.
    """
    return load_provider(provider_key, unbox(provider_box))


@ray.remote(max_retries=0)
def read_units_task(
    provider_box: list,
    provider_key: str,
    directory: Any,
    threads: int,
    item_timeout: float | None = None,
) -> Iterator[Chunk | dict]:
    """Ray generator task: one preload slot, reading units until none is left.

    Parameters
    ----------
    provider_box : list
        ``[ray.put(provider_blob)]``: the pickled provider's ref, in a list so that the
        task can let go of it (see ``load_boxed_provider``).
    provider_key : str
        Identifies the preload run (see ``raycache.provider.load_provider``).
    directory : ray.actor.ActorHandle
        The cache's directory actor, which hands out the units (``preload_claim``).
    threads : int
        Reads in flight at once.
    item_timeout : float, optional
        ``raycache.preload_item_timeout_s`` (see ``read_units``).

    Yields
    ------
    Chunk or dict
        See ``read_units``. The directory actor owns what is yielded.
    """
    began = time.time()  # the run's profile: how long the task took to start
    provider = load_boxed_provider(provider_key, provider_box)

    def claim(done: tuple | None) -> tuple | None:
        # A dead actor raises ActorDiedError here: the task ends, yielding no more.
        return ray.get(directory.preload_claim.remote(provider_key, done), timeout=CLAIM_TIMEOUT_S)

    # Ray copies each yielded chunk into the object store before the generator resumes.
    yield from read_units(
        provider, claim, threads, reuse_columns=True, item_timeout=item_timeout, began=began
    )
