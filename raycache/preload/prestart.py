"""Having Ray start the preload's worker processes while the cache's actor starts.

A preload task needs a Ray worker process. Where none is idle, Ray starts one (a Python
process that imports Ray and registers), which took 0.7-2.5 s on a loaded 2-core
machine, before the task's first read; the directory actor's own process starts just
before, for the same kind of cost. The process that creates a cache with preload on can
call ``prestart_readers`` first: Ray then starts the readers' processes while the actor
starts, and the preload's tasks find them idle. Measured on a fresh local Ray, 4,096
items of 48 KiB, 2 ms per read, 8 threads: from creating the cache to the cache full,
3.5-3.6 s against 3.9-4.9 s without (the preload itself 1.25-1.34 s against 2.0-3.1 s).

The tasks do nothing but import what a preload task imports, so they end at once; no
one needs to wait for them, and a caller may drop what this returns. They ask for the
CPUs a preload task asks for, so Ray starts workers that the preload tasks can use.
"""

from __future__ import annotations

import os

import ray

from raycache.preload.run import slot_count

__all__ = ["prestart_readers"]


@ray.remote(max_retries=0)
def _reader_ready() -> int:
    """Import what a preload task imports first; return this worker's process id."""
    import raycache.preload.task  # noqa: F401  (the import is the point)

    return os.getpid()


def prestart_readers(threads: int, length: int, cpus_per_task: float) -> list:
    """Have Ray start a worker process for each preload slot; return the tasks' refs.

    Parameters
    ----------
    threads : int
        ``preload_threads``.
    length : int
        Number of provider items.
    cpus_per_task : float
        ``raycache.preload_cpus``: CPUs each preload task reserves.

    Returns
    -------
    list of ray.ObjectRef
        One per slot; each resolves to the worker's process id. Dropping them is fine.
    """
    count = slot_count(threads, ray.cluster_resources().get("CPU", 1), length)
    task = _reader_ready.options(num_cpus=cpus_per_task)
    return [task.remote() for _ in range(count)]
