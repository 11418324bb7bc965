"""Reader threads of a preload task: each takes its next read from one shared queue.

Runs in the Ray worker process of a preload task. The task keeps ``threads`` provider
reads in flight; each thread takes the next (unit, position) from one queue and the
task's main thread is woken only when a unit starts draining and when its last read
ends, not at every read: the CPU a read costs is taken from the trainer and the object
store, which share the same cores (``docs/design.md`` has the measurement against a
``ThreadPoolExecutor``). A read that raises, with any exception, is recorded against its
position and the unit still finishes, so a waiter never hangs on a failed read.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Any

__all__ = ["DRAIN_LEAD_READS", "ReaderThreads", "UnitReads"]

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
        self.results[pos] = result
        with self._lock:
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
        self._threads = [
            threading.Thread(target=self._run, name=f"raycache-reader-{k}", daemon=True)
            for k in range(max(1, int(threads)))
        ]
        for thread in self._threads:
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
        lead = DRAIN_LEAD_READS * len(self._threads)
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
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> ReaderThreads:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                unit, pos = self._work.popleft()
            if pos == unit.drain_at:
                unit.draining.set()
            try:
                result = self._read(unit, pos)
            except BaseException as exc:  # recorded against its index; the reads go on
                result = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            unit.finished(pos, result)  # after every read: the unit's waiter must not hang
