"""A thread's CPU time, and the time it was ready to run but waited for a CPU.

A read's share of CPU (CPU seconds over wall seconds) tells a read that computes from
one that waits on I/O, but only on a machine with a free core: where other processes
hold the cores, a computing read also waits, for a CPU, and its share falls as if it
were waiting on I/O. Linux counts that wait per thread (``run_delay`` in
``/proc/thread-self/schedstat``), so a share computed over the wall time less that wait
stays the read's own, on a busy machine too.

Guarantees: both figures come from one read of the same file, so they are consistent
with each other; where the file is missing (not Linux, or a kernel without
scheduler statistics), the CPU time is ``time.thread_time()`` and the wait is 0, the
share as it was measured before.
"""

from __future__ import annotations

import os
import time

__all__ = ["cpu_and_wait"]

_SCHEDSTAT = "/proc/thread-self/schedstat"  # on-CPU ns, run-queue wait ns, timeslices
_HAVE_SCHEDSTAT = os.path.exists(_SCHEDSTAT)


def cpu_and_wait() -> tuple[float, float]:
    """Return this thread's CPU seconds and its seconds spent waiting for a CPU.

    Both count from the thread's start; callers take differences.

    Returns
    -------
    tuple of float
        ``(cpu_s, waited_s)``; ``waited_s`` is 0 where the kernel does not count it.
    """
    if _HAVE_SCHEDSTAT:
        try:
            with open(_SCHEDSTAT, "rb") as f:
                on_cpu, waited = f.read().split()[:2]
            return int(on_cpu) / 1e9, int(waited) / 1e9
        except (OSError, ValueError):
            pass  # below: the thread's CPU time alone
    return time.thread_time(), 0.0
