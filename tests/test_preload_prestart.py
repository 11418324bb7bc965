"""prestart_readers: Ray starts a worker process per preload slot, ahead of the preload."""

from __future__ import annotations

import os

import ray

from raycache.preload import prestart_readers


def test_one_started_worker_per_preload_slot(ray_address):
    refs = prestart_readers(threads=8, length=4096, cpus_per_task=1.0)
    assert len(refs) == 2  # one slot per CPU of the test's Ray (2), fewer than 8 threads
    pids = ray.get(refs, timeout=120)
    assert all(isinstance(pid, int) and pid != os.getpid() for pid in pids)


def test_a_small_provider_prestarts_one_worker(ray_address):
    # Fewer items than one unit's minimum (64): the preload runs one slot, so one worker.
    refs = prestart_readers(threads=8, length=10, cpus_per_task=0.5)
    assert len(refs) == 1
    assert ray.get(refs[0], timeout=120) != os.getpid()
