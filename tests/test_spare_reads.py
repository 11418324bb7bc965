"""CachedDataset reads spare items while a batch waits for a preload unit.

While ``__getitems__`` waits for the preload unit that holds one of its misses, it
reads and inserts items the preload has not reached yet, one at a time, as long as this
process's provider reads mostly wait (I/O) rather than compute.

The scenario: one preload task with one reader thread and units of 8 items, so the
preload hands out units [0, 8) and [8, 16) first and reads them in order. Its read of
index 0 is held at a gate (a Ray actor) until the test process has read two items
itself, or for ``hold_s`` at most: the batch ``[0]`` therefore always finds unit
[0, 8) in flight, and it has to wait for it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import ray
import ray.cloudpickle

import raycache
from raycache import CachedDataset

# The preload tasks unpickle the provider below: ship this module's code by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)

N = 64
UNIT = 8  # raycache.chunk_size: the preload's units hold at most this many items
READ_S = 0.02
SPIN = 400_000  # pure-Python loop iterations: ~20 ms of CPU on this machine
RELEASE_AFTER = 2  # reads in the test process after which the preload may read index 0


@ray.remote(num_cpus=0, max_concurrency=8)
class Gate:
    """Named events that a preload worker and the test process share."""

    def __init__(self):
        self.events = {"reached": threading.Event(), "release": threading.Event()}

    def set(self, name: str) -> None:
        self.events[name].set()

    def wait(self, name: str, timeout: float) -> bool:
        return self.events[name].wait(timeout)


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


class GatedProvider:
    """64 small items; reads sleep (``cpu_bound=False``) or compute, ~20 ms each.

    A preload worker's read of index 0 waits at ``gate`` for ``"release"`` (at most
    ``hold_s``), which the copy in the test process sends after its second read.
    ``reads_here`` lists the indices read in the process that built the provider.
    """

    def __init__(self, gate, cpu_bound: bool, hold_s: float, fail_here: bool = False):
        self.gate = gate
        self.cpu_bound = cpu_bound
        self.hold_s = hold_s
        self.fail_here = fail_here  # every read in the test process raises
        self.owner_pid = os.getpid()
        self.reads_here: list[int] = []

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        here = os.getpid() == self.owner_pid
        if i == 0 and not here:
            ray.get(self.gate.set.remote("reached"), timeout=30)
            ray.get(self.gate.wait.remote("release", self.hold_s), timeout=self.hold_s + 30)
        if self.cpu_bound:
            spin(SPIN)
        else:
            time.sleep(READ_S)
        if here:
            self.reads_here.append(int(i))
            if self.fail_here:
                raise ValueError(f"item {i} cannot be read here")
            if len(self.reads_here) == RELEASE_AFTER:
                ray.get(self.gate.set.remote("release"), timeout=30)
        return {"image": np.full((4,), i, np.float32), "label": int(i)}


def start(cache_name: str, cpu_bound: bool, hold_s: float, fail_here: bool = False):
    gate = Gate.remote()
    provider = GatedProvider(gate, cpu_bound, hold_s, fail_here)
    config = {
        "data_set": {"preload_cache": True, "preload_threads": 1},
        "raycache": {"name": cache_name, "chunk_size": UNIT},
    }
    ds = CachedDataset(provider, config)
    # The preload task is reading index 0 now (unit [0, 8) is handed out), held at the gate.
    assert ray.get(gate.wait.remote("reached", 60), timeout=90), "the preload never reached 0"
    return gate, provider, ds


def check_filled(ds: CachedDataset) -> None:
    """Every item is cached once, with its own values, after the preload has ended."""
    assert ds.cache.wait_for_preload(timeout=60), "the preload did not end"
    assert ds.cache.flush(timeout=30)
    for i in range(N):
        item = ds.cache.try_fetch(i)
        assert item is not None, f"item {i} is not cached"
        np.testing.assert_array_equal(item["image"], np.full((4,), i, np.float32))
        assert item["label"] == i
    stats = ds.cache.stats()
    assert stats["preload_errors"] == []
    assert stats["items"] == N
    assert stats["inserted_items"] + stats["preloaded_items"] == N  # each stored once


def test_a_batch_waiting_for_a_preload_unit_reads_spares_meanwhile(ray_address, cache_name):
    """While the batch waits for unit [0, 8), this process reads items past the preload."""
    gate, provider, ds = start(cache_name, cpu_bound=False, hold_s=4.0)
    try:
        (item,) = ds.__getitems__([0])
        np.testing.assert_array_equal(item["image"], np.zeros(4, np.float32))
        assert item["label"] == 0
        here = list(provider.reads_here)
        # Index 0 came from the preload: the preload held it, this process never read it;
        # it read at least RELEASE_AFTER (2) spares, so the gate was released by them.
        assert len(here) >= RELEASE_AFTER, f"the test process read only {here}"
        assert len(set(here)) == len(here), f"a spare was read twice: {here}"
        assert min(here) >= UNIT, f"read indices the first unit holds: {here}"
        check_filled(ds)
        # The spares were inserted (unless the preload stored one first): nothing
        # beyond what it read.
        assert ds.cache.stats()["inserted_items"] <= len(here)
        assert provider.reads_here == here  # the later reads were all served by the cache
    finally:
        ds.cache.close()
        raycache.drop_cache(cache_name)
        ray.kill(gate)


def test_a_cpu_bound_provider_reads_no_spares(ray_address, cache_name):
    """A process whose reads compute waits for the unit without reading spares."""
    # No spare read releases the gate here: the preload reads index 0 after hold_s.
    hold_s = 1.5
    gate, provider, ds = start(cache_name, cpu_bound=True, hold_s=hold_s)
    try:
        began = time.monotonic()
        # N - 1 is in no unit handed out: read here first (it measures the CPU share),
        # then the batch waits for index 0.
        first, last = ds.__getitems__([0, N - 1])
        waited = time.monotonic() - began
        assert provider.reads_here == [N - 1], f"read spares: {provider.reads_here}"
        assert first["label"] == 0 and last["label"] == N - 1
        np.testing.assert_array_equal(first["image"], np.zeros(4, np.float32))
        np.testing.assert_array_equal(last["image"], np.full((4,), N - 1, np.float32))
        # It did wait for the unit (the gate held it), rather than find 0 cached.
        assert waited > hold_s / 3, f"the batch took {waited:.2f} s: it did not wait"
        check_filled(ds)
        assert provider.reads_here == [N - 1]
    finally:
        ds.cache.close()
        raycache.drop_cache(cache_name)
        ray.kill(gate)


def test_a_failing_spare_read_stops_spare_reads_and_keeps_the_cache(ray_address, cache_name):
    """A spare the provider cannot read here fails no batch; the preload stores it."""
    gate, provider, ds = start(cache_name, cpu_bound=False, hold_s=1.5, fail_here=True)
    try:
        (item,) = ds.__getitems__([0])  # nobody asked for the spare: no error here
        assert item["label"] == 0
        assert len(provider.reads_here) == 1, f"went on reading spares: {provider.reads_here}"
        assert provider.reads_here[0] >= UNIT
        assert not ds.cache.client.dead  # the cache is still in use
        check_filled(ds)  # the preload read the failed spare, in its own process
        assert ds.cache.stats()["inserted_items"] == 0
    finally:
        ds.cache.close()
        raycache.drop_cache(cache_name)
        ray.kill(gate)
