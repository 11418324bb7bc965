"""Several processes share one cache: reads, ownership, concurrent inserts."""

from __future__ import annotations

import multiprocessing as mp

import workers
from conftest import run_python
from providers import ArrayProvider, make_item
from test_values import assert_same

import raycache
from raycache import DataCache

N = 200
ITEM_BYTES = make_item(0)["data"]["image"].nbytes


def test_items_outlive_the_process_that_created_the_cache(ray_address, cache_name):
    # The creator inserts and exits without close(): its buffered items must be sent
    # at exit and the cache must survive its creator.
    run_python(
        f"""
        from providers import ArrayProvider, make_item
        from raycache import DataCache
        cache = DataCache({{"raycache": {{"name": {cache_name!r}}}}}, ArrayProvider({N}))
        for i in range({N}):
            cache.insert_into_cache(i, make_item(i))
        """,
        ray_address,
    )
    cache = DataCache({"raycache": {"name": cache_name}}, ArrayProvider(N))
    for i in range(N):
        assert_same(cache.try_fetch(i), make_item(i))
    stats = cache.stats()
    assert stats["items"] == N
    assert N * ITEM_BYTES <= stats["bytes"] <= 1.2 * N * ITEM_BYTES  # one copy
    cache.close()
    raycache.drop_cache(cache_name)


def test_preload_in_one_process_is_read_by_another(ray_address, cache_name):
    config = {
        "data_set": {"preload_cache": True},
        "raycache": {"name": cache_name, "chunk_size": 64},
    }
    ds = raycache.CachedDataset(ArrayProvider(N, scale=3.0), config)
    assert ds.cache.wait_for_preload(timeout=120)
    out = run_python(
        f"""
        from providers import ArrayProvider, make_item
        from test_values import assert_same
        from raycache import CachedDataset
        config = {config!r}
        ds = CachedDataset(ArrayProvider({N}, scale=3.0), config)  # asks for preload again
        for i in range({N}):
            assert_same(ds.cache.try_fetch(i), make_item(i, 3.0))
        s = ds.cache.stats()
        print(s["items"], s["preload"]["loaded"], s["client"]["hits"], s["client"]["misses"])
        """,
        ray_address,
    )
    assert out.split() == [str(N), str(N), str(N), "0"]
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_concurrent_inserts_of_the_same_indices_count_once(ray_address, cache_name):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    indices = list(range(N))
    procs = [
        ctx.Process(
            target=workers.insert_range,
            args=(ray_address, cache_name, N, order, barrier, out),
        )
        for order in (indices, indices[::-1])
    ]
    for p in procs:
        p.start()
    try:
        assert [out.get(timeout=180), out.get(timeout=180)] == [True, True]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    stats = raycache.cache_stats(cache_name)
    assert stats["items"] == N
    assert stats["bytes"] <= 1.2 * N * ITEM_BYTES
    cache = DataCache({"raycache": {"name": cache_name}}, ArrayProvider(N))
    for i in range(N):
        assert_same(cache.try_fetch(i), make_item(i))
    cache.close()
    raycache.drop_cache(cache_name)


def test_default_name_is_the_same_in_every_process(ray_address):
    name = DataCache({}, ArrayProvider(10, scale=1.5)).name
    out = run_python(
        """
        from providers import ArrayProvider
        from raycache import DataCache
        print(DataCache({}, ArrayProvider(10, scale=1.5)).name)
        """,
        ray_address,
    )
    assert out.strip() == name
