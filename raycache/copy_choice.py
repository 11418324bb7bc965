"""Whether a batch's big copy runs on torch's thread pool or on this thread alone.

``span_copy.copy_rows`` copies a batch's rows over torch's intra-op threads. On an
idle machine two threads copy 48 KiB rows ~1.5x faster than one. On a busy node the
same copy is several times *slower* than one thread's: the pool's threads are
OpenMP threads, the copy waits for the slowest of them, and a thread that has to
share its core with another process is the slowest by a whole scheduler slice
(measured 2026-12-05, 2 cores, one other process spinning on one core: 0.15x the
dict cache's items/s with the pool, 1.03x on one thread).

Whether the pool pays therefore depends on what the rest of the node is doing, now,
which no setting can know in advance. ``CopyChooser`` decides per process by
measuring: the first big copies alternate between the two ways, after which the
faster one (by recent seconds per byte) is used and the other is tried again now
and then, less often each time it loses again, so that a node that becomes busy (or
quiet) is noticed within a few hundred batches at a cost of well under 1% of copies.
Load averages and run-queue counts were not used: they count this process's own
pool threads, which keep spinning for a while after each copy, and they do not see
CPU quotas (cgroups), while a measured copy sees all of it.

Guarantees: the pool is never chosen when it could oversubscribe what this process
may use: only when ``torch.get_num_threads()`` is more than one and no more than the
CPUs in this process's affinity mask (``allowed_threads``), unless a test sets
``CHOOSER.forced``. raycache never changes torch's thread count; it only decides whether
to use the pool torch has.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CHOOSER", "CopyChooser", "allowed_threads", "chosen_copy"]


def _affinity_cpus() -> int:
    """Return the CPUs this process may run on (all CPUs where the OS cannot say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def allowed_threads(torch_threads: int | None = None, cpus: int | None = None) -> int:
    """Return the threads a parallel copy would use, or 1 where it must not run.

    Parameters
    ----------
    torch_threads : int, optional
        Torch's intra-op threads; default ``torch.get_num_threads()``.
    cpus : int, optional
        CPUs in this process's affinity mask; default ``os.sched_getaffinity(0)``.

    Returns
    -------
    int
        ``torch_threads`` if it is more than one and at most ``cpus``, else 1. torch's
        pool always runs ``torch_threads`` threads, so a pool larger than the CPUs this
        process may use would put two of its threads on one CPU: then it is not used.
    """
    threads = torch.get_num_threads() if torch_threads is None else int(torch_threads)
    limit = _affinity_cpus() if cpus is None else int(cpus)
    return threads if 1 < threads <= limit else 1


class CopyChooser:
    """Chooses between the parallel and the one-thread copy from measured copies.

    One per process (``CHOOSER``); callers ask ``parallel()``, time the copy they
    made and ``record`` it.

    Parameters
    ----------
    probes : int
        Timed copies of each way before either is preferred (the first parallel
        copy of a process, which starts torch's pool, is not counted).
    recheck : int
        Copies between two tries of the slower way, at first; it doubles each time
        the slower way stays slower, up to ``max_recheck``, and starts again from
        ``recheck`` when the faster way changes.
    max_recheck : int
        Longest interval between two tries of the slower way.
    threads : callable, optional
        Returns the threads a parallel copy would use (``allowed_threads``).
    """

    def __init__(
        self,
        probes: int = 3,
        recheck: int = 32,
        max_recheck: int = 1024,
        threads: Callable[[], int] | None = None,
    ):
        self.probes = int(probes)
        self.recheck = int(recheck)
        self.max_recheck = int(max_recheck)
        self._threads = allowed_threads if threads is None else threads
        self._lock = threading.Lock()
        # Test hook: True or False makes every copy take that way, unmeasured.
        self.forced: bool | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every measurement (a test hook; also useful after a change of load)."""
        with self._lock:
            # Per way (False: one thread, True: the pool): seconds per byte, averaged.
            self.rate: dict[bool, float | None] = {False: None, True: None}
            self.samples = {False: 0, True: 0}
            self._pool_started = False
            self._interval = self.recheck
            self._since_check = 0
            self._winner: bool | None = None

    def parallel(self, nbytes: int) -> bool:
        """Return True if a copy of ``nbytes`` should run on torch's pool now.

        Parameters
        ----------
        nbytes : int
            Bytes the copy moves (the caller has decided it is big enough for the
            pool to be worth asking about).

        Returns
        -------
        bool
            False whenever ``allowed_threads`` is 1.
        """
        if self.forced is not None:
            return self.forced
        if nbytes <= 0 or self._threads() <= 1:
            return False
        with self._lock:
            if min(self.samples.values()) < self.probes:
                # Still learning: take the way with fewer samples, the pool on a tie.
                return self.samples[True] <= self.samples[False]
            winner = self.rate[True] < self.rate[False]
            self._since_check += 1
            if self._since_check >= self._interval:
                self._since_check = 0
                return not winner
            return winner

    def record(self, parallel: bool, nbytes: int, seconds: float) -> None:
        """Record how long a copy took.

        Parameters
        ----------
        parallel : bool
            Whether it ran on the pool (what ``parallel`` returned).
        nbytes : int
            Bytes it moved.
        seconds : float
            Its wall time.
        """
        if nbytes <= 0 or seconds < 0:
            return
        way = bool(parallel)
        with self._lock:
            if way and not self._pool_started:
                # The pool's first copy also starts its threads: not what a copy costs.
                self._pool_started = True
                return
            rate = seconds / nbytes
            old = self.rate[way]
            if old is None or (self._winner is not None and way != self._winner):
                # A try of the slower way stands for it alone: it is tried rarely, and
                # a node that has become quiet must be noticed at the first try. A
                # wrong switch costs a few copies: the new choice is timed at every
                # copy and loses again.
                self.rate[way] = rate
            else:
                # A running mean that follows the node within a few copies; a mean,
                # not a minimum, because the pool's cost on a busy node is its
                # occasional long waits.
                self.rate[way] = old + 0.3 * (rate - old)
            self.samples[way] += 1
            if min(self.samples.values()) < self.probes:
                return
            winner = self.rate[True] < self.rate[False]
            if winner != self._winner:
                self._winner = winner
                self._interval = self.recheck
            elif way != winner:
                # The slower way was tried and is still slower: try it less often.
                self._interval = min(self._interval * 2, self.max_recheck)

    def snapshot(self) -> dict:
        """Return what it has measured: samples and seconds per MiB of each way.

        Returns
        -------
        dict
            ``{"one_thread": {...}, "pool": {...}, "threads": int}``.
        """
        with self._lock:

            def way(w: bool) -> dict:
                rate = self.rate[w]
                mib = None if rate is None else rate * 2**20
                return {"samples": self.samples[w], "s_per_mib": mib}

            return {"one_thread": way(False), "pool": way(True), "threads": self._threads()}


# The process's chooser: torch's pool and the node's load are per process.
CHOOSER = CopyChooser()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) has its own torch threads and its own share of
    # the node, and the parent's lock may have been held by another thread at the fork.
    CHOOSER._lock = threading.Lock()
    CHOOSER.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def chosen_copy(nbytes: int, pool: Callable[[], Any], one_thread: Callable[[], Any]) -> Any:
    """Run the copy ``CHOOSER`` picks for ``nbytes``, time it and record the time.

    Parameters
    ----------
    nbytes : int
        Bytes the copy moves.
    pool : Callable[[], Any]
        Makes the copy on torch's thread pool.
    one_thread : Callable[[], Any]
        Makes the same copy on this thread.

    Returns
    -------
    Any
        What the chosen callable returned.
    """
    parallel = CHOOSER.parallel(nbytes)
    start = time.perf_counter()
    result = pool() if parallel else one_thread()
    CHOOSER.record(parallel, nbytes, time.perf_counter() - start)
    return result
