"""DataCache.fetch_many and CachedDataset.__getitems__ with hits, misses and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from providers import ArrayProvider, CountingProvider, LoggedReadsProvider, make_item
from test_values import assert_same

import raycache
from raycache import CachedDataset, DataCache, GatheredBatch


def test_fetch_many_mixes_hits_and_misses(ray_address, cache_name):
    cache = DataCache({"raycache": {"name": cache_name, "chunk_size": 8}}, ArrayProvider(40))
    for i in range(0, 40, 2):
        cache.insert_into_cache(i, make_item(i))
    cache.flush(timeout=30)
    got = cache.fetch_many([4, 5, np.int64(6), 39])
    assert got[1] is None and got[3] is None
    assert_same(got[0], make_item(4))
    assert_same(got[2], make_item(6))
    full = cache.fetch_many(np.array([10, 2, 38]))
    assert isinstance(full, GatheredBatch)
    for item, i in zip(full, (10, 2, 38)):
        assert_same(item, make_item(i))
    full[0]["data"]["image"][:] = -1  # a private copy
    assert_same(cache.fetch_many([10])[0], make_item(10))
    with pytest.raises(IndexError, match="40"):
        cache.fetch_many([1, 40])
    with pytest.raises(RuntimeError):
        cache.fetch_many([1, 2.0])
    cache.close()
    raycache.drop_cache(cache_name)


def test_getitems_fills_misses_and_collates(ray_address, cache_name):
    provider = CountingProvider(30)
    ds = CachedDataset(provider, {"raycache": {"name": cache_name, "chunk_size": 8}})
    first = ds.__getitems__([3, 1, 4])
    assert [x["data"]["label"] for x in first] == [3, 1, 4]
    assert provider.reads == 3
    ds.cache.flush(timeout=30)
    again = ds.__getitems__([4, 3, 1])
    assert provider.reads == 3
    batch = ds.collate(again)
    ref = torch.utils.data.default_collate([make_item(i) for i in (4, 3, 1)])
    assert torch.equal(batch["data"]["image"], ref["data"]["image"])
    assert torch.equal(batch["data"]["label"], ref["data"]["label"])
    assert batch["object_id"] == ref["object_id"]
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_batch_read_that_may_not_wait_does_not_wait_for_a_preload_unit(
    ray_address, cache_name, tmp_path
):
    # One task with two threads reads one unit of 32 items of 0.2 s: ~3.2 s.
    provider = LoggedReadsProvider(32, str(tmp_path / "reads.log"), latency_s=0.2)
    config = {
        "data_set": {"preload_cache": True, "preload_threads": 2},
        "raycache": {"name": cache_name, "chunk_size": 32},
    }
    cache = DataCache(config, provider)
    try:
        cache.start_preload_thread()
        deadline = time.monotonic() + 60
        while not provider.reads():
            assert time.monotonic() < deadline, "the preload never started"
            time.sleep(0.01)
        wanted = list(range(16, 32))  # read last: still to come for ~1.5 s or more
        start = time.monotonic()
        assert cache.fetch_many(wanted, wait=False) == [None] * len(wanted)
        assert time.monotonic() - start < 1.0, "wait=False waited for the preload unit"
        got = cache.fetch_many(wanted)  # waits for the unit
        for item, i in zip(got, wanted):
            assert_same(item, make_item(i))
        assert sorted(provider.reads()) == list(range(32))  # read once, by the preload
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def test_batch_reads_that_may_not_wait_see_other_clients_inserts(ray_address, cache_name):
    # Two clients of one cache; the reader also inserts, and the writer's small segments
    # are compacted meanwhile: whatever the reader sees must be right, and it must see
    # every item in the end without waiting for the actor.
    n = 96
    config = {"raycache": {"name": cache_name, "chunk_size": 16}}
    writer = DataCache(config, ArrayProvider(n))
    reader = DataCache(config, ArrayProvider(n))
    try:
        reader.fetch_many([0])  # attach
        for i in range(0, n, 2):
            writer.insert_into_cache(i, make_item(i))
            if i % 16 == 14:
                assert writer.flush(timeout=30)
        for i in range(1, n, 2):
            reader.insert_into_cache(i, make_item(i))
        deadline = time.monotonic() + 30
        while True:
            got = reader.fetch_many(list(range(n)), wait=False)
            for i, item in enumerate(got):
                if item is not None:
                    assert_same(item, make_item(i))
            if all(item is not None for item in got):
                break
            assert time.monotonic() < deadline, "the reader never saw every item"
            time.sleep(0.02)
        assert isinstance(got, GatheredBatch) or len(got) == n
        assert reader.flush(timeout=30)
        stats = reader.stats()
        assert stats["items"] == n
        assert stats["inserted_items"] == n
    finally:
        writer.close()
        reader.close()
        raycache.drop_cache(cache_name)
