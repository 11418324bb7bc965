"""DataCache and CachedDataset in one process, against a real local Ray."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import numpy as np
import pytest
import ray
import torch
from providers import (
    ArrayProvider,
    BigEndianProvider,
    ContainerProvider,
    CountingProvider,
    CrashingProvider,
    HyraxStyleProvider,
    LoggedReadsProvider,
    ReusedBufferProvider,
    SizeStepProvider,
    UnpicklableProvider,
    make_item,
    wait_write_buffers_freed,
)
from test_values import assert_same, rich_item

import raycache
from raycache import CachedDataset, DataCache


def cfg(name, **raycache_keys):
    data_set = {
        k: raycache_keys.pop(k)
        for k in list(raycache_keys)
        if k in ("use_cache", "preload_cache", "preload_threads")
    }
    return {"data_set": data_set, "raycache": {"name": name, **raycache_keys}}


def test_fill_on_miss_then_hit(ray_address, cache_name):
    provider = CountingProvider(50)
    ds = CachedDataset(provider, cfg(cache_name, chunk_size=16))
    first = [ds[i] for i in range(50)]
    assert provider.reads == 50
    assert ds.cache.flush(timeout=30)
    second = [ds[i] for i in range(50)]
    assert provider.reads == 50  # epoch 2 never touched the provider
    for a, b in zip(first, second):
        assert_same(a, b)
    stats = ds.cache.stats()
    assert stats["items"] == 50
    assert stats["client"]["hits"] >= 50
    assert stats["client"]["misses"] == 50
    # The mean durations tensorboardX logs as DataCache/hit_s and the others, this far.
    for name in ("hit_s", "miss_s", "cache_insert_s"):
        assert 0 < stats["client"][name] < 5, (name, stats["client"])
    assert stats["chunks"] <= 50 // 16 + 2  # compacted, not one object per item
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_dataloader_trains_and_collates(ray_address, cache_name):
    ds = CachedDataset(ArrayProvider(100), cfg(cache_name, chunk_size=32))
    loader = torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True, collate_fn=ds.collate)
    for _ in range(2):
        seen = []
        for batch in loader:
            assert batch["data"]["image"].shape == (10, 3, 8, 8)
            labels = batch["data"]["label"].tolist()
            assert batch["data"]["image"][:, 0, 0, 0].tolist() == [float(x) for x in labels]
            assert batch["object_id"] == [f"obj-{x}" for x in labels]
            seen += labels
        ds.cache.flush(timeout=30)
        assert sorted(seen) == list(range(100))
    # The stock collate gets a correct list of items too.
    stock = torch.utils.data.DataLoader(ds, batch_size=7)
    batch = next(iter(stock))
    assert batch["data"]["image"].shape == (7, 3, 8, 8)
    assert ds.cache.stats()["items"] == 100
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_preload_fills_every_item(ray_address, cache_name):
    provider = ArrayProvider(300, scale=0.5)
    ds = CachedDataset(
        provider, cfg(cache_name, preload_cache=True, preload_threads=4, chunk_size=64)
    )
    assert ds.cache.wait_for_preload(timeout=120)
    stats = ds.cache.stats()
    assert stats["items"] == 300
    assert stats["preload"]["state"] == "done"
    assert stats["preload_errors"] == []
    for i in range(300):
        assert_same(ds.cache.try_fetch(i), make_item(i, 0.5))
    # Starting it again (as every rank does) runs nothing new.
    ds.cache.start_preload_thread()
    assert ds.cache.stats()["preload"]["loaded"] == 300
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_stats_say_who_stored_each_item(ray_address, cache_name):
    provider = ArrayProvider(200)
    ds = CachedDataset(provider, cfg(cache_name, chunk_size=64))
    try:
        for i in range(0, 200, 5):  # 40 items filled on miss, before any preload
            ds[i]
        assert ds.cache.flush(timeout=30)
        # Another process's view of the same cache starts the preload (as a rank would).
        loader = DataCache(cfg(cache_name, preload_cache=True, chunk_size=64), provider)
        loader.start_preload_thread()
        assert loader.wait_for_preload(timeout=120)
        loader.close()
        stats = ds.cache.stats()
        assert stats["items"] == 200
        assert stats["inserted_items"] == 40
        assert stats["preloaded_items"] == 160 == stats["preload"]["loaded"]
        for i in (0, 1, 199):
            assert_same(ds.cache.try_fetch(i), make_item(i))
    finally:
        ds.cache.close()
        raycache.drop_cache(cache_name)


def test_preload_reports_failing_index_and_does_not_hang(ray_address, cache_name):
    provider = ArrayProvider(120, fail_at=(13, 77))
    cache = DataCache(cfg(cache_name, preload_cache=True, chunk_size=50), provider)
    cache.start_preload_thread()
    assert cache.wait_for_preload(timeout=120)
    stats = cache.stats()
    assert sorted(e["index"] for e in stats["preload_errors"]) == [13, 77]
    assert "provider cannot read item 13" in " ".join(e["error"] for e in stats["preload_errors"])
    assert stats["items"] == 118
    assert cache.try_fetch(13) is None
    assert cache.try_fetch(14) is not None
    cache.close()
    raycache.drop_cache(cache_name)


def test_a_miss_on_an_item_being_preloaded_waits_instead_of_reading_it(
    ray_address, cache_name, tmp_path
):
    # One task, two threads, units of 32 items of 50 ms: unit 0 takes ~0.8 s to read.
    provider = LoggedReadsProvider(64, str(tmp_path / "reads.log"), latency_s=0.05)
    config = cfg(cache_name, preload_cache=True, preload_threads=2, chunk_size=32)
    cache = DataCache(config, provider)
    try:
        cache.start_preload_thread()
        deadline = time.monotonic() + 60
        while 2 not in provider.reads():  # unit 0 is being read (its second pair, even)
            assert time.monotonic() < deadline, "the preload never started"
            time.sleep(0.01)
        assert_same(cache.try_fetch(31), make_item(31))  # waited for unit 0: a hit
        assert cache.wait_for_preload(timeout=60)
        assert sorted(provider.reads()) == list(range(64))  # every index read once
        assert cache.stats()["preloaded_items"] == 64
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def test_a_preload_task_that_dies_reports_its_units_and_the_rest_is_cached(ray_address, cache_name):
    provider = CrashingProvider(128, crash_at=70, safe_pid=os.getpid())
    config = cfg(cache_name, preload_cache=True, preload_threads=2, chunk_size=16)
    cache = DataCache(config, provider)
    try:
        cache.start_preload_thread()
        assert cache.wait_for_preload(timeout=120)
        stats = cache.stats()
        assert stats["preload"]["state"] == "done_with_errors"
        failed = {e["index"] for e in stats["preload_errors"]}
        assert 70 in failed
        cached = {i for i in range(128) if cache.try_fetch(i) is not None}
        assert cached | failed == set(range(128)) and not cached & failed
        assert len(cached) == stats["items"] >= 128 - 3 * 16  # one slot's claimed units lost
        assert_same(cache.try_fetch(min(cached)), make_item(min(cached)))
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def test_wait_for_preload_times_out_then_finishes(ray_address, cache_name):
    provider = ArrayProvider(40, latency_s=0.05)
    cache = DataCache(
        cfg(cache_name, preload_cache=True, preload_threads=2, chunk_size=10), provider
    )
    cache.start_preload_thread()
    start = time.monotonic()
    assert cache.wait_for_preload(timeout=0.2) is False
    assert time.monotonic() - start < 5
    assert cache.wait_for_preload(timeout=120) is True
    assert cache.stats()["items"] == 40
    cache.close()
    raycache.drop_cache(cache_name)


def test_values_round_trip_through_the_store(ray_address, cache_name):
    items = [rich_item(i) for i in range(6)] + [{"odd": (1, 2)}, [np.ones(2), "x"]]
    provider = ArrayProvider(len(items))
    cache = DataCache(cfg(cache_name), provider)
    for i, item in enumerate(items):
        cache.insert_into_cache(i, item)
    assert cache.flush(timeout=30)
    assert cache.stats()["client"]["pending"] == 0
    for i, item in enumerate(items):
        assert_same(cache.try_fetch(i), item)
    cache.close()
    raycache.drop_cache(cache_name)


def _assert_exactly(got, want, where):
    """``assert_same``, with container subclasses, dict key types and factories too."""
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], where
        assert getattr(got, "default_factory", None) == getattr(want, "default_factory", None)
        for k in want:
            _assert_exactly(got[k], want[k], where)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for a, b in zip(got, want):
            _assert_exactly(a, b, where)
    else:
        assert_same(got, want)


@pytest.mark.parametrize(
    "kind",
    [
        "namedtuple",
        "namedtuple_field",
        "ordered_dict",
        "default_dict",
        "bool_or_int_keys",
        "float_or_int_keys",
        "list_subclass",
    ],
)
def test_container_types_and_key_types_round_trip(ray_address, cache_name, kind):
    provider = ContainerProvider(kind)
    n = len(provider)
    inserted = DataCache(cfg(cache_name + "-i"), provider)
    for i in range(n):
        inserted.insert_into_cache(i, provider[i])
    inserted.flush(timeout=30)
    preloaded = DataCache(cfg(cache_name + "-p", preload_cache=True, preload_threads=2), provider)
    preloaded.start_preload_thread()
    assert preloaded.wait_for_preload(timeout=120)
    for cache, how in ((inserted, "insert"), (preloaded, "preload")):
        for i in range(n):
            _assert_exactly(cache.try_fetch(i), provider[i], f"{how} {i}")
    ds = CachedDataset(provider, cfg(cache_name + "-d"))
    for epoch in range(2):  # epoch 1 fills on miss, epoch 2 reads the cache in batches
        for start in range(0, n, 8):
            got = ds.__getitems__(list(range(start, start + 8)))
            for j, item in enumerate(got):
                _assert_exactly(item, provider[start + j], f"epoch {epoch} item {start + j}")
    for cache in (inserted, preloaded, ds.cache):
        cache.close()
        raycache.drop_cache(cache.name)


def test_big_endian_arrays_collate_into_tensors(ray_address, cache_name):
    # torch holds no other byte order: ds.collate converts, as default_collate cannot.
    provider = BigEndianProvider()
    ds = CachedDataset(provider, cfg(cache_name))
    order = np.random.default_rng(0).permutation(len(provider)).tolist()
    for epoch in range(3):  # epoch 1 fills on miss; later epochs gather from the cache
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=order, collate_fn=ds.collate)
        for k, batch in enumerate(loader):
            items = [provider[i] for i in order[4 * k : 4 * k + 4]]
            x = torch.from_numpy(np.stack([item["x"] for item in items]).astype(np.float32))
            assert batch["x"].dtype == torch.float32, (epoch, batch["x"].dtype)
            assert torch.equal(batch["x"], x), epoch
            assert batch["y"].tolist() == [item["y"] for item in items]
        ds.cache.flush(timeout=30)  # the items are in the cache's chunks from now on
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_a_preload_copies_each_item_when_it_is_read(ray_address, cache_name):
    # One reader thread: the provider's buffer is refilled only after the item before was
    # copied, ragged or not (a ragged item does not fit the unit's columns).
    provider = ReusedBufferProvider()
    cache = DataCache(cfg(cache_name, preload_cache=True, preload_threads=1), provider)
    cache.start_preload_thread()
    assert cache.wait_for_preload(timeout=120)
    for i in range(len(provider)):
        item = cache.try_fetch(i)
        assert item["y"] == i and item["x"].tolist() == [float(i)] * (i % 3 + 1), (i, item)
    cache.close()
    raycache.drop_cache(cache_name)


def test_no_user_code_can_change_cached_bytes(ray_address, cache_name):
    cache = DataCache(cfg(cache_name), ArrayProvider(3))
    cache.insert_into_cache(0, {"x": np.zeros(4, dtype=np.float32), "t": torch.zeros(2)})
    cache.flush(timeout=30)
    got = cache.try_fetch(0)
    got["x"] += 9
    torch.from_numpy(got["x"]).add_(1)
    got["t"].add_(5)
    again = cache.try_fetch(0)
    assert again["x"].sum() == 0 and again["t"].sum() == 0
    # The opt-in zero-copy mode hands out read-only views.
    view_cache = DataCache(cfg(cache_name, zero_copy=True), ArrayProvider(3))
    view = view_cache.try_fetch(0)["x"]
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view += 1
    view_cache.close()
    cache.close()
    raycache.drop_cache(cache_name)


@pytest.mark.parametrize("bad", [1.0, "3", True, np.bool_(False), slice(0, 2), None])
def test_non_integer_index_raises_runtime_error(ray_address, cache_name, bad):
    cache = DataCache(cfg(cache_name), ArrayProvider(5))
    with pytest.raises(RuntimeError, match="int"):
        cache.try_fetch(bad)
    with pytest.raises(RuntimeError):
        cache.insert_into_cache(bad, make_item(0))
    cache.close()


@pytest.mark.parametrize("bad", [-1, 5, 10**12, np.int64(-3)])
def test_out_of_range_index_raises_index_error(ray_address, cache_name, bad):
    cache = DataCache(cfg(cache_name), ArrayProvider(5))
    with pytest.raises(IndexError, match=str(int(bad))):
        cache.try_fetch(bad)
    with pytest.raises(IndexError):
        cache.insert_into_cache(bad, make_item(0))
    ds = CachedDataset(ArrayProvider(5), cfg(cache_name))
    with pytest.raises(IndexError):
        ds[bad]
    cache.close()
    ds.cache.close()


def test_numpy_integers_are_accepted(ray_address, cache_name):
    cache = DataCache(cfg(cache_name), ArrayProvider(5))
    cache.insert_into_cache(np.int32(2), make_item(2))
    assert cache.try_fetch(np.uint8(2))["data"]["label"] == 2
    cache.close()
    raycache.drop_cache(cache_name)


def test_unsupported_value_names_field(ray_address, cache_name):
    cache = DataCache(cfg(cache_name), ArrayProvider(5))
    with pytest.raises(RuntimeError, match=r"data\.meta"):
        cache.insert_into_cache(1, {"data": {"meta": {1, 2}}})
    assert cache.try_fetch(1) is None
    cache.close()
    raycache.drop_cache(cache_name)


def test_unpicklable_provider_fails_at_start(ray_address, cache_name):
    provider = UnpicklableProvider(10)
    with pytest.raises(raycache.ProviderNotPicklableError, match="UnpicklableProvider"):
        CachedDataset(provider, cfg(cache_name, preload_cache=True))
    cache = DataCache(cfg(cache_name, preload_cache=True), provider)
    with pytest.raises(TypeError, match="cannot be pickled"):
        cache.start_preload_thread()
    cache.close()
    # Without preload the same provider works (nothing needs pickling).
    ds = CachedDataset(provider, cfg(cache_name))
    assert ds[3]["data"]["label"] == 3
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_use_cache_false_reads_provider_every_time(ray_address, cache_name):
    provider = CountingProvider(10)
    ds = CachedDataset(provider, cfg(cache_name, use_cache=False, preload_cache=True))
    for _ in range(3):
        for i in range(10):
            assert ds[i]["data"]["label"] == i
    assert provider.reads == 30
    assert ds.cache.try_fetch(3) is None
    assert ds.cache.stats()["items"] == 0
    assert ds.cache.wait_for_preload(timeout=1)
    assert cache_name not in raycache.list_caches()


def test_hyrax_style_provider_preload_computes_raw_items_once(ray_address, cache_name):
    config = cfg(cache_name, preload_cache=True, chunk_size=25)
    provider = HyraxStyleProvider(config, 100)
    provider.data_cache.start_preload_thread()
    assert provider.data_cache.wait_for_preload(timeout=120)
    stats = provider.data_cache.stats()
    assert stats["items"] == 100
    # The preload tasks' own copies of the provider's cache neither answered nor inserted:
    # no hit or miss was counted anywhere but here.
    assert stats["hits"] + stats["misses"] == 0
    for i in range(100):
        assert_same(provider.resolve_data(i), make_item(i))
    assert provider.computed == 0
    provider.data_cache.close()
    raycache.drop_cache(cache_name)


def test_hyrax_style_provider_fills_on_miss_and_cached_dataset_inserts_once(
    ray_address, cache_name
):
    config = cfg(cache_name)
    provider = HyraxStyleProvider(config, 20)
    assert provider.resolve_data(4)["data"]["label"] == 4
    assert provider.resolve_data(4)["data"]["label"] == 4
    assert provider.computed == 1
    ds = CachedDataset(provider, config)
    assert ds[5]["data"]["label"] == 5
    assert ds[5]["data"]["label"] == 5
    assert provider.computed == 2
    ds.cache.flush(timeout=30)
    provider.data_cache.flush(timeout=30)
    assert ds.cache.stats()["items"] == 2
    ds.cache.close()
    provider.data_cache.close()
    raycache.drop_cache(cache_name)


def test_an_insert_into_an_idle_buffer_is_sent_within_flush_interval(ray_address, cache_name):
    """A lone insert reaches the cache after flush_interval_s, not at the next heartbeat."""
    config = cfg(cache_name, chunk_size=8, flush_interval_s=0.1)
    writer, reader = DataCache(config, ArrayProvider(64)), DataCache(config, ArrayProvider(64))
    try:
        writer.stats()  # attached, with nothing buffered: its flush thread sleeps
        assert reader.try_fetch(10) is None
        writer.insert_into_cache(10, make_item(10))
        sent = time.monotonic()
        deadline = sent + 10.0
        # Another process sees it once it is stored (a miss asks what changed at most
        # every 50 ms); before the fix it waited for the next heartbeat, 5 s.
        item = reader.try_fetch(10)
        while item is None and time.monotonic() < deadline:
            time.sleep(0.01)
            item = reader.try_fetch(10)
        waited = time.monotonic() - sent
        assert waited < 2.0, f"the insert was seen after {waited:.1f} s"
        assert_same(item, make_item(10))
    finally:
        writer.close()
        reader.close()


def assert_another_client_reads(config: dict, length: int, count: int) -> None:
    """A second client of the cache reads items ``0..count-1`` back exactly."""
    other = DataCache(config, ArrayProvider(length))
    try:
        for i in range(count):
            assert_same(other.try_fetch(i), make_item(i))
    finally:
        other.close()


def test_a_process_filling_the_cache_alone_sends_its_inserts_a_chunk_at_a_time(
    ray_address, cache_name
):
    """Nobody else changes the cache: inserts a few ms apart go as one chunk, not per interval."""
    config = cfg(cache_name, chunk_size=1000, flush_interval_s=0.5)
    writer = DataCache(config, ArrayProvider(200))
    try:
        writer.stats()
        start = time.monotonic()
        for i in range(100):
            writer.insert_into_cache(i, make_item(i))
            time.sleep(0.005)  # the pace of a provider's reads
        assert writer.flush(timeout=10.0)
        took = time.monotonic() - start
        # 100 items over ~0.5-1 s: before, one segment per 0.5 s, each kept as a chunk.
        assert writer.stats()["chunks"] == 1, f"inserted over {took:.2f} s"
        assert_another_client_reads(config, 200, 100)
    finally:
        writer.close()


def test_inserts_are_sent_within_flush_interval_while_another_process_inserts(
    ray_address, cache_name
):
    """With another writer changing the cache, a steady writer's items go every interval."""
    config = cfg(cache_name, chunk_size=1000, flush_interval_s=0.1)
    other, writer = DataCache(config, ArrayProvider(400)), DataCache(config, ArrayProvider(400))
    reader = DataCache(config, ArrayProvider(400))
    stop = threading.Event()

    def other_inserts() -> None:
        for i in range(200, 400):
            if stop.wait(0.02):
                return
            other.insert_into_cache(i, make_item(i))

    thread = threading.Thread(target=other_inserts, daemon=True)
    try:
        other.insert_into_cache(399, make_item(399))
        assert other.flush(timeout=10.0)
        thread.start()
        writer.stats()  # attached: its map shows the other writer's items
        first = time.monotonic()
        seen = None
        for i in range(150):  # ~3 s of steady inserts, longer than ALONE_FLUSH_S
            writer.insert_into_cache(i, make_item(i))
            if seen is None and reader.try_fetch(0) is not None:
                seen = time.monotonic() - first
            time.sleep(0.02)
        assert seen is not None and seen < 1.5, f"item 0 seen after {seen} s"
    finally:
        stop.set()
        thread.join(timeout=10.0)
        for cache in (other, writer, reader):
            cache.close()


def test_write_buffers_are_freed_once_the_process_stops_inserting(ray_address, cache_name):
    """The columns kept for the next inserts go once inserts stop; later inserts still work."""
    from raycache.client import WRITE_IDLE_S

    cache = DataCache(cfg(cache_name, chunk_size=8, flush_interval_s=0.05), ArrayProvider(64))
    try:
        for i in range(5):  # one segment, sent in one flush
            cache.insert_into_cache(i, make_item(i))
        assert cache.flush(timeout=10.0)
        kept = cache.client.inspect().spare_buffers
        assert kept, "sent segments' columns are kept for the next inserts"
        columns = [weakref.ref(b) for b in kept]
        del kept
        freed = wait_write_buffers_freed(cache, WRITE_IDLE_S + 10.0)
        assert freed, f"write buffers still held {WRITE_IDLE_S + 10.0:.0f} s on"
        gc.collect()
        # Freed, not only dropped from the spares: nothing (a sent segment) still holds them.
        assert columns and all(ref() is None for ref in columns)
        for i in range(5, 40):
            cache.insert_into_cache(i, make_item(i))
        assert cache.flush(timeout=10.0)
        assert_another_client_reads(cfg(cache_name), 64, 40)
    finally:
        cache.close()


def test_stats_keys_and_close_keeps_cache(ray_address, cache_name):
    a = DataCache(cfg(cache_name), ArrayProvider(8))
    a.insert_into_cache(1, make_item(1))
    stats = a.stats()
    for key in ("length", "items", "bytes", "hits", "misses", "chunks", "preload_errors"):
        assert key in stats
    assert stats["length"] == 8 and stats["items"] == 1
    assert stats["bytes"] >= make_item(1)["data"]["image"].nbytes
    a.close()
    b = DataCache(cfg(cache_name), ArrayProvider(8))
    assert b.try_fetch(1)["data"]["label"] == 1
    with pytest.raises(raycache.CacheUnavailableError):
        a.try_fetch(1)
    b.close()
    assert raycache.drop_cache(cache_name)
    assert not raycache.drop_cache(cache_name)


def test_a_dropped_name_is_free_when_drop_cache_returns(ray_address, cache_name):
    """Right after a drop, a new cache of that name is a new, empty one; a second drop is False.

    ``ray.kill`` returns before Ray frees the actor's name: a drop that did not wait for it
    let a second drop find the dying actor (seen once in CI).
    """
    for round_ in range(4):
        cache = DataCache(cfg(cache_name), ArrayProvider(8))
        assert cache.stats()["items"] == 0, f"round {round_}: the old cache answered"
        cache.insert_into_cache(round_, make_item(round_))
        assert cache.flush(timeout=30)
        cache.close()
        assert raycache.drop_cache(cache_name)
        assert not raycache.drop_cache(cache_name), f"round {round_}: the name was still taken"


def test_reused_name_with_other_length_is_refused(ray_address, cache_name):
    a = DataCache(cfg(cache_name), ArrayProvider(8))
    a.try_fetch(0)
    b = DataCache(cfg(cache_name), ArrayProvider(9))
    with pytest.raises(raycache.CacheMismatchError, match="drop_cache"):
        b.try_fetch(0)
    a.close()
    raycache.drop_cache(cache_name)


def test_default_names_separate_splits_and_match_same_provider(ray_address):
    train, val = ArrayProvider(10, scale=1.0), ArrayProvider(10, scale=2.0)
    a, b = DataCache({}, train), DataCache({}, val)
    assert a.name != b.name
    assert DataCache({}, ArrayProvider(10, scale=1.0)).name == a.name


def test_byte_budget_is_enforced(ray_address, cache_name):
    item_bytes = make_item(0)["data"]["image"].nbytes
    cache = DataCache(
        cfg(cache_name, max_bytes=item_bytes * 10 + 500, chunk_size=4), ArrayProvider(40)
    )
    for i in range(40):
        cache.insert_into_cache(i, make_item(i))
    cache.flush(timeout=30)
    stats = cache.stats()
    assert stats["bytes"] <= stats["max_bytes"]
    assert 0 < stats["items"] < 40
    assert stats["rejected_items"] == 40 - stats["items"]
    cache.close()
    raycache.drop_cache(cache_name)


def test_stats_count_this_process_reads_at_once(ray_address, cache_name):
    ds = CachedDataset(ArrayProvider(64), cfg(cache_name))
    for trial in range(4):
        for i in range(64):
            ds[i]
        stats = ds.cache.stats()
        # The cache's totals hold every read this process made before the call.
        assert (stats["hits"], stats["misses"]) == (64 * trial, 64), (trial, stats)
        assert (stats["client"]["hits"], stats["client"]["misses"]) == (64 * trial, 64)
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_a_later_process_max_bytes_is_named_in_a_warning(ray_address, cache_name, caplog):
    first = DataCache(cfg(cache_name, max_bytes=1_000_000), ArrayProvider(4))
    first.stats()  # creates the cache with its budget
    with caplog.at_level("WARNING", logger="raycache"):
        second = DataCache(cfg(cache_name, max_bytes=2_000_000), ArrayProvider(4))
        assert second.stats()["max_bytes"] == 1_000_000
    lines = [r.getMessage() for r in caplog.records if "max_bytes" in r.getMessage()]
    assert len(lines) == 1 and "1,000,000" in lines[0] and "2,000,000" in lines[0], lines
    assert f"raycache drop {cache_name}" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="raycache"):
        DataCache(cfg(cache_name, max_bytes=1_000_000), ArrayProvider(4)).stats()
        DataCache(cfg(cache_name), ArrayProvider(4)).stats()  # no budget asked: no word
    assert not [r for r in caplog.records if "max_bytes" in r.getMessage()]
    first.close()
    second.close()
    raycache.drop_cache(cache_name)


def test_a_process_asking_to_keep_a_lingering_cache_keeps_it(ray_address, cache_name):
    lingering = DataCache(cfg(cache_name, linger_s=0.5), ArrayProvider(4))
    lingering.insert_into_cache(0, make_item(0))
    lingering.flush(timeout=30)
    assert lingering.stats()["detached"] is False
    keeper = DataCache(cfg(cache_name, detached=True), ArrayProvider(4))
    assert keeper.stats()["detached"] is True
    keeper.close()
    lingering.close()
    # No client for three times linger_s plus the actor's reap interval: a lingering
    # cache would be gone (test_non_detached_cache_is_freed_after_linger); this one stays.
    deadline = time.monotonic() + 3 * (0.5 + 1.0)
    while time.monotonic() < deadline:
        assert cache_name in raycache.list_caches(), "a cache asked to be kept was freed"
        time.sleep(0.2)
    raycache.drop_cache(cache_name)


def test_non_detached_cache_is_freed_after_linger(ray_address, cache_name):
    cache = DataCache(cfg(cache_name, linger_s=0.5), ArrayProvider(4))
    cache.insert_into_cache(0, make_item(0))
    cache.close()
    deadline = time.monotonic() + 30
    while cache_name in raycache.list_caches() and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the cluster's actor list: there is no event to wait on
    assert cache_name not in raycache.list_caches()


def test_detached_cache_stays_after_last_client(ray_address, cache_name):
    cache = DataCache(cfg(cache_name, linger_s=0, detached=True), ArrayProvider(4))
    cache.insert_into_cache(0, make_item(0))
    cache.close()
    time.sleep(2.5)  # longer than the reaper interval: the cache must still be there
    assert cache_name in raycache.list_caches()
    assert raycache.cache_stats(cache_name)["items"] == 1
    raycache.drop_cache(cache_name)


def test_metrics_are_written(ray_address, cache_name, tmp_path):
    cache = DataCache(cfg(cache_name, log_dir=str(tmp_path)), ArrayProvider(30))
    cache.logging_interval = 10
    for i in range(30):
        cache.insert_into_cache(i, make_item(i))
        cache.try_fetch(i)
    cache.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("events.out.tfevents*"))
    for tag in (
        b"DataCache/cache_insert_s",
        b"DataCache/cache_count",
        b"DataCache/cache_bytes",
        b"DataCache/hit_s",
    ):
        assert tag in blob
    raycache.drop_cache(cache_name)


def test_preload_metrics_are_written(ray_address, cache_name, tmp_path):
    config = cfg(cache_name, preload_cache=True, chunk_size=20, log_dir=str(tmp_path))
    ds = CachedDataset(ArrayProvider(60), config)
    assert ds.cache.wait_for_preload(timeout=120)
    ds.cache.close()
    raycache.drop_cache(cache_name)  # the actor closes its event file when dropped
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("events.out.tfevents*"))
    assert b"DataCache/preload_1k_obj_s" in blob


def test_preload_sizes_chunks_by_bytes_when_chunk_size_is_unset(ray_address, cache_name):
    # make_item is ~800 bytes; 64 KiB chunks hold ~80 items whatever the item count.
    provider = ArrayProvider(2000)
    config = cfg(cache_name, preload_cache=True, chunk_bytes=64 * 1024, preload_threads=4)
    ds = CachedDataset(provider, config)
    assert ds.cache.wait_for_preload(timeout=120)
    stats = ds.cache.stats()
    assert stats["items"] == 2000 and stats["preload_errors"] == []
    assert stats["preload"]["units"] == stats["chunks"]
    # Never more than a chunk's bytes per chunk: at least 2000 / 82 chunks ...
    assert stats["chunks"] >= 2000 // 82
    # ... and few small ones: the probe units and a shrinking tail.
    assert stats["chunks"] <= 2000 // 64 + 16
    for i in (0, 81, 82, 1999):
        assert_same(ds[i], make_item(i))
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_preload_cpus_lets_preload_run_beside_trainers_holding_cpus(ray_address, cache_name):
    # Hold every CPU of the local Ray, as Ray Train workers would.
    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    cpus = int(ray.cluster_resources()["CPU"])
    holders = [Holder.remote() for _ in range(cpus)]
    ray.get([h.ready.remote() for h in holders], timeout=60)
    try:
        config = cfg(cache_name, preload_cache=True, preload_cpus=0, chunk_size=50)
        ds = CachedDataset(ArrayProvider(200), config)
        assert ds.cache.wait_for_preload(timeout=60)
        assert ds.cache.stats()["items"] == 200
        ds.cache.close()
    finally:
        for h in holders:
            ray.kill(h)
        raycache.drop_cache(cache_name)


def test_preload_cpus_is_validated():
    with pytest.raises(raycache.ConfigError, match="preload_cpus"):
        DataCache({"raycache": {"preload_cpus": -1}}, ArrayProvider(3))
    with pytest.raises(raycache.ConfigError, match="preload_cpus"):
        DataCache({"raycache": {"preload_cpus": "all"}}, ArrayProvider(3))


def test_chunk_bytes_holds_once_bigger_items_are_seen(ray_address, cache_name):
    # The probe units see 80-byte items; from index 100 on items take 4 KiB.
    provider = SizeStepProvider(600, step=100)
    limit = 64 * 1024
    config = cfg(cache_name, preload_cache=True, chunk_bytes=limit, preload_threads=2)
    ds = CachedDataset(provider, config)
    assert ds.cache.wait_for_preload(timeout=120)
    assert ds.cache.stats()["items"] == 600
    client = ds.cache.client
    client.sync(force=True)
    chunks = client.views(client.inspect().chunk_ids)
    assert sum(len(chunk) for chunk in chunks) == 600
    # Units cut before any unit of big items came back can be far too big: each task slot
    # holds the unit it reads and claims one ahead, so at most two per slot (2 slots
    # here; CI once saw all four, the last one included). Units sized from the probe
    # [96, 128) alone (4 small items, 28 big: a mean of 3.6 KiB) hold 18 big items, 1.13x
    # the limit, until a unit of big items only comes back; the chunks sized after that fit.
    far_over = [chunk for chunk in chunks if chunk.nbytes > 1.2 * limit]
    assert len(far_over) <= 4, [(c.indices[[0, -1]], c.nbytes) for c in chunks]
    for i in (0, 99, 100, 599):
        got = ds[i]
        assert got["label"] == i and got["image"].shape == ((8,) if i < 100 else (512,))
    ds.cache.close()
    raycache.drop_cache(cache_name)
