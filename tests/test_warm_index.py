"""Warm batches through ``WarmIndex``: exact, current after any change, only where it can."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import raycache
import raycache.client.warm_index
from raycache import CachedDataset, DataCache, GatheredBatch
from raycache.client.warm_index import MIN_STEADY

POINT = np.dtype([("x", "<f4"), ("flag", "u1")])  # 5 bytes: rows at odd addresses


def item(i, scale=1):
    point = np.zeros((), POINT)
    point["x"], point["flag"] = i * 0.5 * scale, i % 256
    return {
        "image": np.full((2, 3), i * scale, dtype=np.float32),
        "code": (np.arange(7, dtype=np.uint8) + i * scale) % 251,  # 7-byte rows
        "point": point,
        "label": i * scale,
    }


def ragged(i):
    return {"image": np.full(1 + i % 3, i, dtype=np.int64), "label": i}


class Items:
    def __init__(self, n, make=item):
        self.n = n
        self.make = make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def assert_items(batch, idx, make=item, scale=1):
    assert len(batch) == len(idx)
    for got, i in zip(batch, idx):
        want = make(int(i), scale) if make is item else make(int(i))
        assert list(got) == list(want)
        for key in want:
            assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), (i, key)


@contextmanager
def cached(name, n, make=item, indices=None):
    """A cache of ``n`` items, those at ``indices`` inserted; dropped afterwards."""
    cache = cache_of(name, n, make, indices)
    try:
        yield cache
    finally:
        cache.close()
        raycache.drop_cache(name)


def cache_of(name, n, make=item, indices=None, chunk_size=8):
    cache = DataCache({"raycache": {"name": name, "chunk_size": chunk_size}}, Items(n, make))
    indices = list(range(n)) if indices is None else list(indices)
    cache.insert_many(indices, [make(i) for i in indices])
    assert cache.flush(timeout=30)
    cache.attach().sync(force=True)
    return cache


def steady_batches(cache, n, seed=0, make=item, limit=1000, scale=1):
    """Read shuffled batches of cached items, checking each, until they are read through
    an index (at most ``limit``); return how many it took."""
    rng = np.random.default_rng(seed)
    for count in range(1, limit + 1):
        idx = rng.permutation(n)[:16]
        batch = cache.fetch_many(idx)
        assert isinstance(batch, GatheredBatch)
        assert_items(batch, idx, make, scale)
        if cache.attach().inspect().warm_index:
            return count
    return limit


def read_batches(cache, pool, count, seed, make=item, scale=1):
    """Read ``count`` shuffled batches of 12 indices from ``pool``, checking each."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        idx = rng.choice(pool, 12, replace=False)
        assert_items(cache.fetch_many(idx), idx, make, scale)


def test_warm_batches_are_read_through_the_index_and_are_exact(ray_address, cache_name):
    cache = cache_of(cache_name, 120)
    try:
        assert not cache.attach().inspect().warm_index
        taken = steady_batches(cache, 120)
        assert MIN_STEADY <= taken < 1000
        read_batches(cache, np.arange(120), 20, seed=1)  # through it, unless the map moved
        got = cache.fetch_many(np.arange(120)[::-1])
        assert_items(got, np.arange(120)[::-1])
        got[0]["image"][:] = -1  # private copies: the cache is unchanged
        got = raycache.collate(cache.fetch_many([119, 0]))
        assert torch.equal(got["image"][:, 0, 0], torch.tensor([119.0, 0.0]))
        assert torch.equal(got["label"], torch.tensor([119, 0]))
        assert cache.attach().hits == 16 * taken + 12 * 20 + 120 + 2  # this process's count
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def test_an_index_not_cached_when_it_was_built_is_read_once_cached(ray_address, cache_name):
    even = np.arange(0, 96, 2)
    cache = cache_of(cache_name, 96, indices=even.tolist())
    try:
        rng = np.random.default_rng(2)
        for _ in range(1000):
            idx = rng.choice(even, 12, replace=False)
            assert_items(cache.fetch_many(idx), idx)
            if cache.attach().inspect().warm_index:
                break
        assert cache.attach().inspect().warm_index
        got = cache.fetch_many([4, 5], wait=False)  # 5 is not cached: the usual way
        assert_items(got[:1], [4])
        assert got[1] is None
        other = DataCache({"raycache": {"name": cache_name, "chunk_size": 8}}, Items(96))
        try:
            odd = list(range(1, 96, 2))
            other.insert_many(odd, [item(i) for i in odd])
            assert other.flush(timeout=30)
        finally:
            other.close()
        cache.attach().sync(force=True)  # the map moves on (a miss would, rate-limited)
        assert not cache.attach().inspect().warm_index  # the index it had is stale
        idx = np.array([5, 4, 95, 1])
        assert_items(cache.fetch_many(idx), idx)
        assert steady_batches(cache, 96, seed=3) < 1000  # built again, with every index
        assert_items(cache.fetch_many(np.arange(96)), np.arange(96))
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def test_a_cache_dropped_and_filled_again_is_read_anew(ray_address, cache_name):
    cache = cache_of(cache_name, 64)
    try:
        assert steady_batches(cache, 64) < 1000
        raycache.drop_cache(cache_name)
        refilled = DataCache({"raycache": {"name": cache_name, "chunk_size": 8}}, Items(64))
        try:
            refilled.insert_many(list(range(64)), [item(i, 3) for i in range(64)])
            assert refilled.flush(timeout=30)
            # Same process, same chunk ids, same layout: read through an index of its own.
            assert steady_batches(refilled, 64, seed=4, scale=3) < 1000
            read_batches(refilled, np.arange(64), 20, seed=5, scale=3)
        finally:
            refilled.close()
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def test_ragged_fields_are_read_the_usual_way(ray_address, cache_name):
    with cached(cache_name, 48, make=ragged) as cache:
        read_batches(cache, np.arange(48), 100, seed=6, make=ragged)
        assert not cache.attach().inspect().warm_index


def named(i):
    return {
        "image": np.full(2, i, dtype=np.float32),
        "object_id": f"obj-{i}",
        "score": np.float32(i / 2),
        "tag": None if i % 2 else b"even",
    }


def mixed(i):
    return {
        "image": np.full(2, i, dtype=np.float32),
        "extra": np.full(2, i, [np.int64, np.int8][i % 2]),
    }


def indexed_batch(cache, make, seed):
    """Read until batches come through the index, then one more of 20; checked."""
    assert steady_batches(cache, 64, make=make) < 1000
    idx = np.random.default_rng(seed).permutation(64)[:20]
    batch = cache.fetch_many(idx)
    assert_items(batch, idx, make)
    return idx, batch


def test_fields_of_immutable_values_are_read_through_the_index(ray_address, cache_name):
    with cached(cache_name, 64, make=named) as cache:
        idx, batch = indexed_batch(cache, named, seed=8)
        for got, i in zip(batch, idx):
            assert got["object_id"] == f"obj-{i}" and type(got["score"]) is np.float32
            assert got["tag"] == (None if i % 2 else b"even")
        collated = raycache.collate(cache.fetch_many(idx))
        assert collated["object_id"] == [f"obj-{i}" for i in idx]


def scored(i):
    return {"image": np.full(3, i, dtype=np.float32), "label": np.int64(i), "ok": np.bool_(i % 2)}


def test_fields_of_numpy_scalars_are_read_through_the_index_as_numpy_scalars(
    ray_address, cache_name
):
    with cached(cache_name, 64, make=scored) as cache:
        idx, batch = indexed_batch(cache, scored, seed=9)
        for got, i in zip(batch, idx):
            assert type(got["label"]) is np.int64 and got["label"] == i
            assert type(got["ok"]) is np.bool_ and got["ok"] == bool(i % 2)
        collated = raycache.collate(cache.fetch_many(idx))
        assert collated["label"].dtype == torch.int64 and collated["ok"].dtype == torch.bool
        assert collated["label"].tolist() == idx.tolist()


def test_fields_of_arrays_that_differ_leave_no_index_and_stay_private(ray_address, cache_name):
    with cached(cache_name, 48, make=mixed) as cache:
        read_batches(cache, np.arange(48), 100, seed=9, make=mixed)
        assert not cache.attach().inspect().warm_index
        got = cache.fetch_many([3, 4])
        got[0]["extra"][:] = -1
        assert_items(cache.fetch_many([3, 4]), [3, 4], mixed)


def test_no_index_beyond_its_size_limit(ray_address, cache_name, monkeypatch):
    monkeypatch.setattr(raycache.client.warm_index, "MAX_ENTRIES", 64 * 4 - 1)  # 4 columns
    with cached(cache_name, 64) as cache:
        read_batches(cache, np.arange(64), 100, seed=7)
        assert not cache.attach().inspect().warm_index


def big(i):
    return {"image": np.full((16, 1024), i, dtype=np.float32), "label": i}


@pytest.mark.parametrize("forced", [True, False])
def test_big_batches_through_the_index_are_exact_either_way(
    ray_address, cache_name, monkeypatch, forced
):
    # 64 KiB rows: a batch of 16 is 1 MiB, so the copy may run over torch's pool.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    raycache.copy_choice.CHOOSER.reset()
    monkeypatch.setattr(raycache.copy_choice.CHOOSER, "forced", forced)
    ds = CachedDataset(Items(96, big), {"raycache": {"name": cache_name, "chunk_size": 8}})
    try:
        ds.cache.insert_many(list(range(96)), [big(i) for i in range(96)])
        assert ds.cache.flush(timeout=30)
        for _ in range(30):
            seen = []
            for batch in DataLoader(ds, batch_size=16, shuffle=True, collate_fn=ds.collate):
                labels = batch["label"].tolist()
                want = torch.tensor(labels, dtype=torch.float32)
                assert torch.equal(batch["image"][:, 5, 7], want)
                assert torch.equal(batch["image"].amin(dim=(1, 2)), want)
                assert torch.equal(batch["image"].amax(dim=(1, 2)), want)
                seen += labels
            assert sorted(seen) == list(range(96))
            if ds.cache.attach().inspect().warm_index:
                break
        assert ds.cache.attach().inspect().warm_index
        for batch in DataLoader(ds, batch_size=16, shuffle=True, collate_fn=ds.collate):
            want = batch["label"].to(torch.float32)
            assert torch.equal(batch["image"].amin(dim=(1, 2)), want)
            assert torch.equal(batch["image"].amax(dim=(1, 2)), want)
    finally:
        torch.set_num_threads(before)
        ds.cache.close()
        raycache.drop_cache(cache_name)


def test_forked_workers_read_exactly_epoch_after_epoch(ray_address, cache_name):
    cache_of(cache_name, 120).close()  # filled by another client, then read by workers
    ds = CachedDataset(Items(120), {"raycache": {"name": cache_name, "chunk_size": 8}})
    try:
        loader = DataLoader(
            ds,
            batch_size=8,
            shuffle=True,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context="fork",
            collate_fn=ds.collate,
        )
        for _ in range(6):
            seen = []
            for batch in loader:
                labels = batch["label"]
                assert torch.equal(batch["image"][:, 1, 2], labels.to(torch.float32))
                assert torch.equal(batch["code"][:, 0], (labels % 251).to(torch.uint8))
                seen += labels.tolist()
            assert sorted(seen) == list(range(120))
        assert ds.cache.stats()["misses"] == 0
    finally:
        ds.cache.close()
        raycache.drop_cache(cache_name)
