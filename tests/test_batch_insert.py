"""Inserting a batch of misses at once: ``CachedDataset.__getitems__`` and ``insert_many``.

Real Ray; what a batch inserted is read back, from this process and from a new one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_python
from test_batch import ItemsProvider, plain_item
from test_values import assert_same, rich_item

from raycache import CachedDataset
from raycache.client.batch_put import flatten_batch
from raycache.values import UnsupportedValueError


def open_ds(name, make, n=100, chunk_size=16):
    config = {"raycache": {"name": name, "chunk_size": chunk_size}}
    return CachedDataset(ItemsProvider(n, make), config)


def read_back(ds, indices):
    """Flush, then read ``indices`` from the directory's chunks (not this process's buffer)."""
    assert ds.cache.flush(timeout=30)
    client = ds.cache.attach()
    client.sync(force=True)
    return [ds.cache.try_fetch(int(i)) for i in indices]


def test_flatten_batch_marks_uniform_batches_only():
    flats, uniform, error = flatten_batch([0, 1, 2], [plain_item(i) for i in range(3)])
    assert uniform and error is None and len(flats) == 3
    assert all(f[0] == flats[0][0] for f in flats)
    # Same structure, another dtype: valid, but not one layout.
    items = [plain_item(0), dict(plain_item(1), image=np.zeros((3, 4, 4), np.float64))]
    flats, uniform, error = flatten_batch([0, 1], items)
    assert not uniform and error is None and len(flats) == 2
    items = [{"a": 1}, {"b": 1}]
    assert not flatten_batch([0, 1], items)[1]


def test_flatten_batch_names_index_and_field_of_a_bad_item():
    items = [plain_item(0), plain_item(1), {"image": np.zeros(2), "meta": {"x": object()}}]
    flats, _, error = flatten_batch([10, 11, 12], items)
    assert len(flats) == 2
    assert isinstance(error, UnsupportedValueError)
    assert "item 12" in str(error) and "meta.x" in str(error)


def test_a_batch_of_misses_is_read_back_equal(ray_address, cache_name):
    ds = open_ds(cache_name, plain_item)
    try:
        indices = [7, 3, 50, 41, 0, 99, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]
        got = ds.__getitems__(indices)
        for i, item in zip(indices, got):
            assert_same(item, plain_item(i))
        for i, item in zip(indices, read_back(ds, indices)):
            assert_same(item, plain_item(i))
        stats = ds.cache.stats()
        assert stats["items"] == len(indices)
        assert stats["chunks"] >= 2  # 20 items, chunk_size 16: the batch was split
    finally:
        ds.cache.close()


def test_mixed_structures_in_a_batch_fall_back_item_by_item(ray_address, cache_name):
    def make(i):
        return rich_item(i) if i % 3 else {"other": np.arange(i, dtype=np.int16), "k": i}

    ds = open_ds(cache_name, make, n=40)
    try:
        indices = list(range(0, 40, 2))
        ds.__getitems__(indices)
        for i, item in zip(indices, read_back(ds, indices)):
            assert_same(item, make(i))
    finally:
        ds.cache.close()


def test_a_bad_item_raises_naming_index_and_field_and_keeps_the_items_before(
    ray_address, cache_name
):
    def make(i):
        item = plain_item(i)
        if i == 5:
            item["nested"]["tup"] = (0.5, object())
        return item

    ds = open_ds(cache_name, make, n=20)
    try:
        with pytest.raises(UnsupportedValueError, match=r"item 5.*nested\.tup\[1\]"):
            ds.cache.insert_many([1, 2, 5, 6], [make(i) for i in (1, 2, 5, 6)])
        got = read_back(ds, [1, 2, 5, 6])
        assert_same(got[0], plain_item(1))
        assert_same(got[1], plain_item(2))
        assert got[2] is None and got[3] is None
    finally:
        ds.cache.close()


def test_duplicates_keep_the_first_value(ray_address, cache_name):
    ds = open_ds(cache_name, plain_item, n=20)
    try:
        ds.cache.insert_into_cache(4, plain_item(100))
        assert ds.cache.flush(timeout=30)
        ds.cache.insert_into_cache(6, plain_item(106))  # buffered, not sent yet
        ds.cache.insert_many(
            [4, 5, 5, 6, 7],
            [plain_item(200), plain_item(105), plain_item(300), plain_item(0), plain_item(107)],
        )
        got = read_back(ds, [4, 5, 6, 7])
        for item, want in zip(got, (100, 105, 106, 107)):
            assert_same(item, plain_item(want))
    finally:
        ds.cache.close()


def test_a_batch_inserted_is_visible_at_once_and_to_another_process(ray_address, cache_name):
    ds = open_ds(cache_name, plain_item, n=64)
    try:
        ds.cache.insert_many(list(range(32)), [plain_item(i) for i in range(32)])
        # Visible to this process before any flush (served from the write buffer).
        assert_same(ds.cache.try_fetch(17), plain_item(17))
        assert ds.cache.flush(timeout=30)
        out = run_python(
            f"""
import numpy as np, torch
import raycache
from test_batch import ItemsProvider, plain_item
from test_values import assert_same
config = {{"raycache": {{"name": "{cache_name}"}}}}
cache = raycache.DataCache(config, ItemsProvider(64, plain_item))
for i in range(32):
    assert_same(cache.try_fetch(i), plain_item(i))
print("ok", cache.stats()["items"])
cache.close()
""",
            ray_address,
        )
        assert "ok 32" in out
    finally:
        ds.cache.close()


def test_tensor_items_in_a_batch_keep_dtype_shape_and_values(ray_address, cache_name):
    def make(i):
        return (torch.full((2, 5), i, dtype=torch.float16), np.int64(i))

    ds = open_ds(cache_name, make, n=30)
    try:
        indices = list(range(30))
        ds.__getitems__(indices)
        for i, item in zip(indices, read_back(ds, indices)):
            assert_same(item, make(i))
    finally:
        ds.cache.close()


def test_a_batch_laid_out_otherwise_than_its_chunk_is_added_item_by_item(ray_address, cache_name):
    def make(i):
        dtype = np.float32 if i < 8 else np.float64
        return {"x": np.full((2, 3), i, dtype=dtype), "i": i}

    ds = open_ds(cache_name, make, n=16, chunk_size=64)
    try:
        ds.cache.insert_many(list(range(8)), [make(i) for i in range(8)])
        ds.cache.insert_many(list(range(8, 16)), [make(i) for i in range(8, 16)])
        for i, item in zip(range(16), read_back(ds, range(16))):
            assert_same(item, make(i))
    finally:
        ds.cache.close()


class HyraxStyleProvider:
    """A Hyrax DataProvider (``resolve_data``) whose read of one index raises."""

    def __init__(self, n, bad):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("raycache reads a Hyrax DataProvider with resolve_data")

    def resolve_data(self, i):
        if i == self.bad:
            raise OSError(f"cannot open the file of object {i}")
        return plain_item(i)


def test_a_failed_read_in_a_batch_names_its_index_and_keeps_the_items_before(
    ray_address, cache_name
):
    config = {"raycache": {"name": cache_name, "chunk_size": 16}}
    ds = CachedDataset(HyraxStyleProvider(40, bad=7), config)
    try:
        with pytest.raises(OSError, match="object 7") as caught:
            ds.__getitems__([3, 5, 7, 9])
        assert "raised by the provider reading index 7" in caught.value.__notes__
        back = read_back(ds, [3, 5, 7, 9])
        assert [item is None for item in back] == [False, False, True, True]
        assert_same(back[0], plain_item(3))
        assert_same(back[1], plain_item(5))
        # The batch without the bad index is read and served whole.
        assert [int(item["label"]) for item in ds.__getitems__([9, 11, 3])] == [9, 11, 3]
    finally:
        ds.cache.close()
