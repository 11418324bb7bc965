"""DataCache.fetch_many and CachedDataset.__getitems__ with hits, misses and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from providers import ArrayProvider, CountingProvider, make_item
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
