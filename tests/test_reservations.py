"""A trainer reading alongside the preload reserves what it reads; nothing is read twice.

While a preload runs, ``CachedDataset`` reads itself the misses no preload unit holds and,
while it waits for a unit, spare items. Those are reserved for it first, so the preload's
units leave them out; what a trainer reserved and never stored (its read failed, or it
died) is read by the preload after its other units.
"""

from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest
import ray
import torch
from conftest import run_python
from providers import (
    ArrayProvider,
    ExitOnReadProvider,
    FailsHereProvider,
    LoggedReadsProvider,
)
from torch.utils.data import DataLoader

from raycache import CachedDataset
from raycache.preload import index_runs

pytestmark = pytest.mark.timeout(180)


def _config(name: str, threads: int, chunk_size: int | None = None) -> dict:
    raycache_keys = {"name": name}
    if chunk_size is not None:
        raycache_keys["chunk_size"] = chunk_size
    return {
        "data_set": {"preload_cache": True, "preload_threads": threads},
        "raycache": raycache_keys,
    }


def _check_full(ds: CachedDataset, n: int, scale: float = 1.0) -> dict:
    """After the preload: every item cached once, with its own values; the stats."""
    assert ds.cache.wait_for_preload(timeout=60), "the preload did not end"
    assert ds.cache.flush(timeout=30)
    for i in range(n):
        item = ds.cache.try_fetch(i)
        assert item is not None, f"item {i} is not cached"
        np.testing.assert_array_equal(item["data"]["image"], np.full((3, 8, 8), i * scale))
        assert item["data"]["label"] == i
    stats = ds.cache.stats()
    assert stats["preload_errors"] == []
    assert stats["items"] == n
    assert stats["inserted_items"] + stats["preloaded_items"] == n
    return stats


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_trainer_reading_alongside_the_preload_reads_nothing_twice(
    ray_address, cache_name, tmp_path
):
    """Over a first epoch with preload, each item is read once, by the trainer or a task."""
    n = 384
    provider = LoggedReadsProvider(n, str(tmp_path / "reads.log"), latency_s=0.005)
    ds = CachedDataset(provider, _config(cache_name, threads=4))
    try:
        loader = DataLoader(ds, batch_size=32, shuffle=True, collate_fn=ds.collate)
        seen = []
        for batch in loader:
            labels = batch["data"]["label"]
            expected = torch.full((len(labels), 3, 8, 8), 0.0) + labels.view(-1, 1, 1, 1)
            torch.testing.assert_close(batch["data"]["image"], expected)
            seen += labels.tolist()
        assert sorted(seen) == list(range(n))
        stats = _check_full(ds, n)
        twice = {i: c for i, c in collections.Counter(provider.reads()).items() if c > 1}
        assert twice == {}, f"items read more than once (index: reads): {twice}"
        assert sorted(set(provider.reads())) == list(range(n))
        # The trainer did read alongside the preload (its batches' misses, spares).
        assert stats["inserted_items"] > 0, stats
    finally:
        ds.cache.close()


def test_a_batch_missing_more_than_its_share_leaves_the_rest_to_the_next_unit(
    ray_address, cache_name, tmp_path
):
    """A trainer reads only its share of a batch that misses everything; a task reads the rest.

    One task of 4 threads against a trainer reading one item at a time: the trainer's share
    of 64 misses is 64 / (4 + 1), rounded up, so it reads 13 of them, not all it could
    reserve, and the batch is whole sooner.
    """
    n = 64
    provider = LoggedReadsProvider(n, str(tmp_path / "reads.log"), latency_s=0.02)
    ds = CachedDataset(provider, _config(cache_name, threads=4, chunk_size=8))
    try:
        assert ds.cache.stats()["preload"]["tasks"] == 1
        items = ds.__getitems__(list(range(n - 1, -1, -1)))
        assert [int(item["data"]["label"]) for item in items] == list(range(n - 1, -1, -1))
        for item in items:
            np.testing.assert_array_equal(
                item["data"]["image"], np.full((3, 8, 8), float(item["data"]["label"]))
            )
        mine = provider.reads(os.getpid())
        assert 0 < len(mine) <= 13, f"the trainer read {len(mine)} of {n} items: {mine}"
        _check_full(ds, n)
        twice = {i: c for i, c in collections.Counter(provider.reads()).items() if c > 1}
        assert twice == {}, f"items read more than once (index: reads): {twice}"
    finally:
        ds.cache.close()


def test_a_wanted_item_that_fails_is_reported_once_and_raises_for_the_batch(
    ray_address, cache_name, tmp_path
):
    """A miss left to the next unit fails there: the batch raises it, the range skips it."""
    n, bad = 64, 40
    provider = LoggedReadsProvider(n, str(tmp_path / "reads.log"), latency_s=0.02, fail_at=(bad,))
    ds = CachedDataset(provider, _config(cache_name, threads=4, chunk_size=8))
    try:
        with pytest.raises(ValueError, match=f"cannot read item {bad}"):
            ds.__getitems__(list(range(n - 1, -1, -1)))
        assert ds.cache.wait_for_preload(timeout=60), "the preload did not end"
        stats = ds.cache.stats()
        assert [e["index"] for e in stats["preload_errors"]] == [bad], stats["preload_errors"]
        assert stats["items"] == n - 1
        # Read by the preload once, then by the trainer for its batch; nothing else twice.
        counts = collections.Counter(provider.reads())
        assert counts[bad] <= 2
        assert {i: c for i, c in counts.items() if c > 1 and i != bad} == {}
        for i in range(n):
            item = ds.cache.try_fetch(i)
            assert (item is None) == (i == bad), i
    finally:
        ds.cache.close()


def test_spare_items_handed_to_two_trainers_differ_and_are_left_by_the_preload(
    ray_address, cache_name
):
    """Spares come from the top, one trainer each; a released spare goes back to the preload."""
    n = 256
    ds = CachedDataset(ArrayProvider(n, latency_s=0.02), _config(cache_name, 1, chunk_size=8))
    try:
        actor = ds.cache.client.actor
        none = np.zeros(0, dtype=np.int64)
        _, a, inflight = ray.get(actor.reserve.remote("trainer-a", none, 8), timeout=30)
        _, b, _ = ray.get(actor.reserve.remote("trainer-b", none, 8), timeout=30)
        assert inflight is not None, "the preload should be running"
        assert len(a) == len(b) == 8
        assert not set(a.tolist()) & set(b.tolist()), (a, b)
        # From the top of what no unit has reached: the preload gets there last.
        frontier = max(inflight.values(), default=0)
        assert min(a.tolist() + b.tolist()) >= frontier
        assert sorted(a.tolist() + b.tolist()) == list(range(n - 16, n))
        assert ds.cache.stats()["preload"]["reserved"] == 16
        ray.get(actor.release_reserved.remote("trainer-a", a), timeout=30)
        # Releasing another trainer's spares does not end b's leases.
        ray.get(actor.release_reserved.remote("trainer-a", b), timeout=30)
        assert ds.cache.stats()["preload"]["reserved"] == 8
        # Nobody stores b's spares: once their lease ends, the preload reads them too.
        _check_full(ds, n)
    finally:
        ds.cache.close()


def test_a_reserved_item_the_trainer_fails_to_read_is_read_by_the_preload(ray_address, cache_name):
    """The read error reaches the caller; the reservation ends at once; the preload reads it."""
    n = 128
    provider = FailsHereProvider(n, fail_here=(n - 1,), latency_s=0.01)
    ds = CachedDataset(provider, _config(cache_name, 1, chunk_size=8))
    try:
        # Units of 8 from index 0: no unit holds n - 1 yet, so this process reserves it.
        with pytest.raises(ValueError, match="cannot be read in this process"):
            ds.__getitems__([n - 1])
        # Released, not left to its lease (RESERVE_LEASE_S = 5 s).
        assert _wait_for(lambda: ds.cache.stats()["preload"]["reserved"] == 0, timeout=3.0)
        stats = _check_full(ds, n)
        assert stats["inserted_items"] == 0
    finally:
        ds.cache.close()


def test_items_reserved_by_a_trainer_that_died_are_read_by_the_preload(ray_address, cache_name):
    """A trainer dies while reading its reserved misses: the cache still fills, correctly."""
    # ~8 s of preload at one thread: it must still run when the trainer process has started,
    # joined Ray and attached, which takes a few seconds on a loaded machine (the preload's
    # readers are started with the cache, so the preload does not wait for them).
    n = 400
    config = _config(cache_name, 1, chunk_size=8)
    ds = CachedDataset(ExitOnReadProvider(n, latency_s=0.02), config)
    try:
        run_python(
            f"""
            import os
            import ray
            from providers import EXIT_ON_READ_ENV, ExitOnReadProvider
            from raycache import CachedDataset

            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
            os.environ[EXIT_ON_READ_ENV] = "1"
            ds = CachedDataset(ExitOnReadProvider({n}, latency_s=0.02), {config!r})
            assert ds.cache.client.preloading, "the trainer should see the preload"
            ds.__getitems__([{n - 1}, {n - 2}, {n - 3}])  # reserves them, dies reading
            """,
            ray_address,
            returncode=3,
        )
        stats = _check_full(ds, n)
        assert stats["inserted_items"] == 0
    finally:
        ds.cache.close()


def test_index_runs_are_the_spans_a_trainer_waits_on_for_picked_indices():
    """Picked indices (wanted, leftover) are waited on by their runs, not by one span."""
    assert index_runs(np.zeros(0, dtype=np.int64)) == []
    assert index_runs(np.array([7])) == [(7, 8)]
    assert index_runs(np.array([3, 4, 5, 9, 11, 12])) == [(3, 6), (9, 10), (11, 13)]
