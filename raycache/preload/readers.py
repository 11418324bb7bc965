"""Reader threads of a preload task: each takes its next read from one shared queue.

Runs in the Ray worker process of a preload task. The task keeps ``threads`` provider
reads in flight; each thread takes the next (unit, position) from one queue and the
task's main thread is woken only when a unit starts draining and when its last read
ends, not at every read: the CPU a read costs is taken from the trainer and the object
store, which share the same cores (``docs/design.md`` has the measurement against a
``ThreadPoolExecutor``). A read that raises, with any exception, is recorded against its
position and the unit still finishes, so a waiter never hangs on a failed read.

A read that never returns (a provider stuck on a network file) cannot be stopped from
another thread. ``ReaderThreads.wait`` with an ``item_timeout`` records such a read as
failed once it has run that long, leaves its thread to it and starts another reader in
its place, so the unit ends and the preload goes on; the stuck thread's result, if it
ever comes, is ignored (``UnitReads.finished`` counts each position once).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Any

__all__ = ["DRAIN_LEAD_READS", "ReaderThreads", "UnitReads", "timeout_message"]

# ``draining`` is set this many reads per thread before a unit's reads run out. The
# preload task then claims its next unit from the directory actor; the lead must outlast
# that round trip (~1 ms) or the threads idle at every unit's end, and a lead of one 2 ms
# read often did not (docs/design.md).
DRAIN_LEAD_READS = 2


class UnitReads:
    """The reads of one unit: a result per position, and events as they start and end.

    ``draining`` is set once the reads left to start are no more than
    ``DRAIN_LEAD_READS`` per reader thread (so the threads run out of this unit's reads
    within about that many reads' time), ``done`` once every read has ended.

    Parameters
    ----------
    key : int
        How the directory actor names the unit (``PreloadRun.claim``).
    indices : list of int
        The indices to read, by position.
    builder : Any
        Where the reads put their items (a ``ChunkBuilder``).
    """

    def __init__(self, key: int, indices: list[int], builder: Any):
        self.key = key
        self.indices = indices
        self.builder = builder
        self.results: list[str | None] = [None] * len(indices)
        self.done = threading.Event()
        self.draining = threading.Event()
        self.drain_at = 0  # the position whose start sets ``draining`` (see ReaderThreads)
        self.timed_out: list[int] = []  # positions given up on (``ReaderThreads.wait``)
        self._ended = bytearray(len(indices))
        self._left = len(indices)
        self._lock = threading.Lock()
        if not indices:
            self.done.set()
            self.draining.set()

    def finished(self, pos: int, result: str | None) -> None:
        """Record the read at ``pos`` (its error, or None); set ``done`` after the last.

        Parameters
        ----------
        pos : int
            The position read.
        result : str or None
            The error, if the read failed.
        """
        with self._lock:
            if self._ended[pos]:  # given up on already (timed out): its result is late
                return
            self._ended[pos] = 1
            self.results[pos] = result
            self._left -= 1
            last = self._left == 0
        if last:
            self.done.set()


class ReaderThreads:
    """``threads`` threads that carry out the reads of queued units, in queue order.

    Use as a context manager: leaving it drops the reads not started yet and waits
    for the ones in flight, so a task that stops early leaves no thread behind.

    Parameters
    ----------
    read : Callable[[UnitReads, int], str | None]
        Reads position ``pos`` of a unit; returns an error message or None. An
        exception it raises (any, so that the unit still finishes) is recorded as the
        read's error.
    threads : int
        Reads in flight at once.
    """

    def __init__(self, read: Callable[[UnitReads, int], str | None], threads: int):
        self._read = read
        self._work: deque[tuple[UnitReads, int]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: dict[int, threading.Thread] = {}
        self._reading: dict[int, tuple[UnitReads, int, float]] = {}  # thread -> its read
        self._given_up: set[int] = set()  # threads left to a read that timed out
        self._next = 0
        for _ in range(max(1, int(threads))):
            self._start_thread()

    def _start_thread(self) -> None:
        k, self._next = self._next, self._next + 1
        thread = threading.Thread(
            target=self._run, args=(k,), name=f"raycache-reader-{k}", daemon=True
        )
        self._threads[k] = thread
        thread.start()

    def queue(self, unit: UnitReads) -> UnitReads:
        """Queue every read of ``unit`` after those queued before; return the unit.

        Parameters
        ----------
        unit : UnitReads
            The unit.

        Returns
        -------
        UnitReads
            The same unit (wait on its ``done``).
        """
        lead = DRAIN_LEAD_READS * (len(self._threads) - len(self._given_up))
        unit.drain_at = max(0, len(unit.indices) - 1 - lead)
        with self._cond:
            if self._closed:
                raise RuntimeError("raycache reader threads are closed; no unit can be queued")
            self._work.extend(zip(repeat(unit), range(len(unit.indices))))
            self._cond.notify_all()
        return unit

    def close(self) -> None:
        """Drop the reads not started, and wait for the threads to end."""
        with self._cond:
            self._closed = True
            self._work.clear()
            self._cond.notify_all()
        # A thread given up on may never return from its read: it is not waited for.
        for k, thread in list(self._threads.items()):
            if k not in self._given_up:
                thread.join()

    def wait(self, event: threading.Event, item_timeout: float | None) -> None:
        """Wait for ``event``; meanwhile give up on reads running over ``item_timeout``.

        Parameters
        ----------
        event : threading.Event
            A unit's ``draining`` or ``done``.
        item_timeout : float or None
            Seconds one read may take; None waits for every read, however long.
        """
        if item_timeout is None:
            event.wait()
            return
        poll = min(1.0, max(0.01, item_timeout / 4))
        while not event.wait(poll):
            self.expire(item_timeout)

    def expire(self, item_timeout: float) -> int:
        """Record reads running over ``item_timeout`` as failed; replace their threads.

        Parameters
        ----------
        item_timeout : float
            Seconds one read may take.

        Returns
        -------
        int
            Reads given up on by this call.
        """
        now = time.monotonic()
        late = []
        with self._cond:
            for k, (unit, pos, started) in list(self._reading.items()):
                if now - started > item_timeout and not self._closed:
                    del self._reading[k]
                    self._given_up.add(k)
                    late.append((unit, pos))
                    self._start_thread()  # the stuck thread's place: the reads go on
        for unit, pos in late:
            unit.timed_out.append(pos)
            unit.finished(pos, timeout_message(unit.indices[pos], item_timeout))
        return len(late)

    def __enter__(self) -> ReaderThreads:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, k: int) -> None:
        while True:
            with self._cond:
                if k in self._given_up:  # its read outlasted the timeout: another took over
                    return
                self._reading.pop(k, None)
                while not self._work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                unit, pos = self._work.popleft()
                self._reading[k] = (unit, pos, time.monotonic())
            if pos == unit.drain_at:
                unit.draining.set()
            try:
                result = self._read(unit, pos)
            except BaseException as exc:  # recorded against its index; the reads go on
                result = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            unit.finished(pos, result)  # after every read: the unit's waiter must not hang


def timeout_message(idx: int, item_timeout: float) -> str:
    """Return the error recorded for a read of ``idx`` that outlasted ``item_timeout``.

    Parameters
    ----------
    idx : int
        The provider index.
    item_timeout : float
        The limit, in seconds.

    Returns
    -------
    str
        The error, naming the config key that sets the limit.
    """
    return (
        f"TimeoutError: reading index {idx} took over {item_timeout:g} s "
        "(raycache.preload_item_timeout_s); the preload went on without it"
    )
