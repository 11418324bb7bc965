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
measuring: a few copies each way first, after which the faster way is used and the
other is measured again now and then, less often each time it loses again, so that a
node that becomes busy (or quiet) is noticed within a few hundred batches at a cost of
a few percent of copies at most. Where the pool lost while other processes held the
CPUs it would use, it is measured again only every ``max_recheck`` copies, or as soon
as those CPUs are seen idle: there each pool copy costs several one-thread copies, and
the bursts alone cost two trainers sharing 2 cores 15% of their items/s (measured
2026-12-06: 1.23x the dict cache's items/s with rechecks at doubling intervals, 1.46x
with none).

How much faster the pool must be depends on whether other processes use this
process's CPUs (``raycache.idle_cpus``, which discounts this process's own threads;
load averages cannot, as they count the pool's threads spinning after each copy).
Where others do, or where that cannot be read, the pool must be clearly faster
(``margin``): its occasional long waits cost several times what it saves. Where
they leave the pool's threads idle CPUs, it is taken when it is faster at all
(``quiet_margin``): on 2 cores left to this process the pool copied 3 MiB batches of
48 KiB rows 1.26x faster than one thread, a per-copy gain the clear-margin rule sat on the
edge of. Either way the decision rests on measured copies, which also see CPU quotas
(cgroups) that ``/proc/stat`` does not.

The first pool copy after one-thread copies is not counted: the pool's threads have
gone to sleep, and waking them made that copy cost 1.6x a copy while the pool is in
use (0.28 ms vs 0.17 ms for 3 MiB, 2 cores left to this process), which steady
use never pays. Counted in a burst of four, it made the pool look slower than one
thread where it was 1.26x faster.

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

from raycache.idle_cpus import OthersLoad

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
    if torch_threads is None:
        import torch  # here, not on import: a process that never copies a batch does not need it

        torch_threads = torch.get_num_threads()
    threads = int(torch_threads)
    limit = _affinity_cpus() if cpus is None else int(cpus)
    return threads if 1 < threads <= limit else 1


class CopyChooser:
    """Chooses between the parallel and the one-thread copy from measured copies.

    One per process (``CHOOSER``); callers ask ``parallel()``, time the copy they
    made and ``record`` it.

    Each way is measured in *bursts* of ``probes`` copies in a row, whose mean seconds
    per byte stands for that way until its next burst; the way in use also updates its
    figure at every copy (a running mean). The pool is taken only at the end of one of
    its bursts, and only if it was clearly faster (``margin``); one thread is taken back
    at any copy where the pool's running mean falls behind it. The asymmetry is
    deliberate: on a busy node the pool costs several times what it saves on a quiet
    one, and one lucky pool copy must not switch to it.

    Parameters
    ----------
    probes : int
        Copies in a burst (the first parallel copy of a process, which starts torch's
        pool, is not counted).
    recheck : int
        Copies between two bursts of the way not in use, at first; it doubles each
        time that way loses again, up to ``max_recheck``, and starts again from
        ``recheck`` when the way in use changes.
    max_recheck : int
        Longest interval between two bursts of the way not in use; the interval of
        the pool's bursts at once where it lost while ``others`` reports the CPUs
        busy (it is then tried sooner, after ``recheck`` copies at least, once
        ``others`` reports them idle).
    margin : float
        The pool is taken when its seconds per byte are below ``margin`` times one
        thread's, where other processes use this process's CPUs.
    quiet_margin : float
        The same where they leave the pool's threads idle CPUs.
    threads : callable, optional
        Returns the threads a parallel copy would use (``allowed_threads``).
    others : callable, optional
        Returns the CPUs (of this process's affinity) that other processes kept busy
        lately, or None where unknown (then ``margin`` applies); default
        ``raycache.idle_cpus.OthersLoad().sample``.
    """

    def __init__(
        self,
        probes: int = 4,
        recheck: int = 32,
        max_recheck: int = 1024,
        margin: float = 0.8,
        quiet_margin: float = 1.0,
        threads: Callable[[], int] | None = None,
        others: Callable[[], float | None] | None = None,
    ):
        self.probes = int(probes)
        self.recheck = int(recheck)
        self.max_recheck = int(max_recheck)
        self.margin = float(margin)
        self.quiet_margin = float(quiet_margin)
        self._threads = allowed_threads if threads is None else threads
        self._load = OthersLoad() if others is None else None
        self._others = self._load.sample if others is None else others
        self._lock = threading.Lock()
        # Test hook: True or False makes every copy take that way, unmeasured.
        self.forced: bool | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every measurement (a test hook; also useful after a change of load)."""
        with self._lock:
            # Per way (False: one thread, True: the pool): seconds per byte.
            self.rate: dict[bool, float | None] = {False: None, True: None}
            self.samples = {False: 0, True: 0}
            self.pool = False  # the way in use once both are measured
            self._last_way: bool | None = None
            self._interval = self.recheck
            self._since_check = 0
            self._held_off = False  # the pool lost while others held the CPUs
            self._burst: bool | None = None  # the way being measured in a burst
            self._burst_left = 0
            self._burst_s = self._burst_bytes = 0.0
            if self._load is not None:
                self._load.restart()

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
            if self._burst is not None:
                return self._burst
            for way in (False, True):  # learning: a first burst of each, the pool last
                if self.rate[way] is None:
                    return self._start_burst(way)
            self._since_check += 1
            due = self._since_check >= self._interval
            if not due and self._held_off and self._since_check >= self.recheck:
                due = self._others_idle()  # the node has gone quiet: try the pool now
            if due:
                self._since_check = 0
                return self._start_burst(not self.pool)
            return self.pool

    def _start_burst(self, way: bool) -> bool:
        self._burst, self._burst_left = way, self.probes
        self._burst_s = self._burst_bytes = 0.0
        return way

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
        if nbytes <= 0 or seconds < 0 or self.forced is not None:
            return
        way = bool(parallel)
        with self._lock:
            cold = way and self._last_way is not True
            self._last_way = way
            if cold:
                # Wakes (or first starts) the pool's threads: not what its copies cost
                # while it is in use. A burst of the pool is one copy longer for it.
                return
            self.samples[way] += 1
            if way == self._burst:
                self._burst_s += seconds
                self._burst_bytes += nbytes
                self._burst_left -= 1
                if self._burst_left <= 0:
                    self._burst = None
                    self.rate[way] = self._burst_s / self._burst_bytes
                    self._decide(burst_of=way)
            elif way == self.pool and self.rate[way] is not None:
                # A running mean, not a minimum: the pool's cost on a busy node is its
                # occasional long waits.
                self.rate[way] += 0.3 * (seconds / nbytes - self.rate[way])
                if way:
                    self._decide(burst_of=None)

    def _decide(self, burst_of: bool | None) -> None:
        """Pick the way in use (lock held) after a burst or a pool copy."""
        if self.rate[True] is None or self.rate[False] is None:
            return
        if burst_of is True:  # the only time the pool is taken
            margin = self.quiet_margin if self._idle() else self.margin
            pool = self.rate[True] < margin * self.rate[False]
        else:  # kept while it is faster at all (no flapping at the margin)
            pool = self.pool and self.rate[True] < self.rate[False]
        if pool != self.pool:
            self.pool = pool
            self._interval = self.recheck
            self._since_check = 0
        elif burst_of is not None and burst_of != pool:
            self._interval = min(self._interval * 2, self.max_recheck)
        # The pool lost with others on the CPUs it would use: each burst of it costs
        # several one-thread copies there, so it is tried again only after
        # ``max_recheck`` copies, or sooner once those CPUs are seen idle.
        self._held_off = not pool and self._others_busy()
        if self._held_off:
            self._interval = self.max_recheck

    def _idle(self) -> bool:
        """Return True if other processes leave the pool's threads idle CPUs."""
        return self._others_idle() is True

    def _others_busy(self) -> bool:
        """Return True if other processes are known to use the pool's CPUs."""
        return self._others_idle() is False

    def _others_idle(self) -> bool | None:
        """Return whether others leave the pool's threads idle CPUs; None if unknown."""
        others = self._others()
        if others is None:
            return None
        # A quarter of a CPU of slack: Ray's own processes and the kernel's threads.
        return others <= _affinity_cpus() - self._threads() + 0.25

    def snapshot(self) -> dict:
        """Return what it has measured: samples and seconds per MiB of each way.

        Returns
        -------
        dict
            ``{"one_thread": {...}, "pool": {...}, "threads": int, "in_use": str,
            "others_cpus": float or None}``.
        """
        with self._lock:

            def way(w: bool) -> dict:
                rate = self.rate[w]
                mib = None if rate is None else rate * 2**20
                return {"samples": self.samples[w], "s_per_mib": mib}

            return {
                "one_thread": way(False),
                "pool": way(True),
                "threads": self._threads(),
                "in_use": "pool" if self.pool else "one_thread",
                "others_cpus": None if self._load is None else self._load.latest,
            }


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
