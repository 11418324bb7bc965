"""Inserts handed to the directory actor through the trainer's shared memory.

Real Ray, on one node: the actor reads a trainer's buffers by ``/proc/<pid>/fd``; a
reference that names another file, or a trainer on another node, is refused and the
chunks travel as call arguments, with the same result.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import ray
from conftest import run_python
from test_batch import ItemsProvider, plain_item
from test_values import assert_same

import raycache
from raycache import CachedDataset
from raycache.chunk import Chunk
from raycache.client import staging
from raycache.client.staging import StagedSpares, staged_chunks
from raycache.columns import NumberColumn, StackedColumn
from raycache.staged_columns import StagedArray, StagingUnavailable, open_staged

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux only")


@ray.remote(num_cpus=0)
def _read_staged(chunks, pid):
    """In a Ray worker (another process, same node): the staged columns' values."""
    try:
        opened = open_staged(chunks, pid)
    except StagingUnavailable as exc:
        return f"refused: {exc}"
    data = opened[0].columns[0].data
    return data.copy(), bool(data.flags.writeable)


def _staged_chunk(spares, rows=5, shape=(3, 4)):
    column, _ = spares.take(np.dtype(np.float32), shape, rows)
    column[...] = np.arange(column.size, dtype=np.float32).reshape(column.shape)
    numbers = NumberColumn(np.arange(rows, dtype=np.int64))
    chunk = Chunk(np.arange(rows, dtype=np.int64), None, [StackedColumn(column, False), numbers])
    return chunk, column


def test_another_process_reads_the_staged_buffer_without_a_copy(ray_address):
    spares = StagedSpares()
    chunk, column = _staged_chunk(spares)
    staged = staged_chunks([chunk], spares)
    assert isinstance(staged[0].columns[0].data, StagedArray)
    assert staged[0].columns[1] is chunk.columns[1]  # small columns travel as they are
    values, writeable = ray.get(_read_staged.remote(staged, os.getpid()), timeout=60)
    np.testing.assert_array_equal(values, column)
    assert not writeable  # the actor maps the trainer's memory read-only


def test_a_reference_to_another_file_is_refused(ray_address):
    spares = StagedSpares()
    chunk, _ = _staged_chunk(spares)
    staged = staged_chunks([chunk], spares)
    ref = staged[0].columns[0].data
    # The descriptor of a buffer freed and its number reused, or another pid namespace.
    wrong = ref._replace(inode=ref.inode + 1)
    staged[0].columns[0] = StackedColumn(wrong, False)
    reply = ray.get(_read_staged.remote(staged, os.getpid()), timeout=60)
    assert reply.startswith("refused:") and "no longer the buffer named" in reply
    past_the_end = ref._replace(offset=ref.offset + 4096)
    staged[0].columns[0] = StackedColumn(past_the_end, False)
    assert "does not fit" in ray.get(_read_staged.remote(staged, os.getpid()), timeout=60)


def test_heap_columns_are_not_staged():
    spares = StagedSpares()
    chunk = Chunk(np.arange(2), None, [StackedColumn(np.ones((2, 3)), False)])
    assert staged_chunks([chunk], spares) is None


def test_a_freed_buffer_closes_its_file():
    spares = StagedSpares()
    column, buffer = spares.take(np.dtype(np.uint8), (16,), 4)
    where = spares.locate(column)
    link = f"/proc/self/fd/{where.fd}"
    assert os.stat(link).st_ino == where.inode
    del column, buffer
    assert spares.locate(np.zeros(1)) is None
    assert not os.path.exists(link) or os.stat(link).st_ino != where.inode


def test_the_buffers_of_segments_in_flight_come_back_for_the_next_inserts(ray_address):
    # A fast fill has a segment filling and up to three sent; those that come back are
    # all kept (fresh shared memory costs 4-8x memory written before), not just two.
    pool = staging.InsertSender(None).spares
    assert isinstance(pool, StagedSpares)
    taken = [pool.take(np.dtype(np.float32), (8,), 16)[1] for _ in range(staging.SPARE_BUFFERS + 1)]
    addresses = {b.__array_interface__["data"][0] for b in taken}
    pool.give(taken)
    again = [pool.take(np.dtype(np.float32), (8,), 16)[1] for _ in range(staging.SPARE_BUFFERS)]
    assert {b.__array_interface__["data"][0] for b in again} <= addresses
    assert len({id(b) for b in again}) == staging.SPARE_BUFFERS
    fresh = pool.take(np.dtype(np.float32), (8,), 16)[1]  # one more than is kept: new
    assert fresh.__array_interface__["data"][0] not in {
        b.__array_interface__["data"][0] for b in again
    }


def _filled(name, n=200):
    ds = CachedDataset(ItemsProvider(n, plain_item), {"raycache": {"name": name}})
    for start in range(0, n, 32):
        ds.__getitems__(list(range(start, min(n, start + 32))))
    assert ds.cache.flush(timeout=60)
    return ds


@pytest.mark.parametrize(
    "node_id, path", [(None, "shared memory"), ("elsewhere", "call arguments")]
)
def test_fill_on_miss_is_read_back_whichever_way_it_was_sent(
    ray_address, cache_name, node_id, path, monkeypatch
):
    if node_id is not None:  # as the actor sees a trainer on another node
        monkeypatch.setattr(staging, "this_node", lambda: node_id)
    ds = _filled(cache_name)
    try:
        stats = ds.cache.stats()
        assert stats["items"] == 200 and stats["inserted_items"] == 200
        assert stats["client"]["insert_path"] == path
        code = f"""
import numpy as np, raycache
from test_batch import ItemsProvider, plain_item
from test_values import assert_same
config = {{"raycache": {{"name": {cache_name!r}}}}}
cache = raycache.DataCache(config, ItemsProvider(200, plain_item))
for i in (0, 57, 131, 199):
    assert_same(cache.try_fetch(i), plain_item(i))
print("read", cache.stats()["client"]["misses"])
cache.close()
"""
        assert run_python(code, ray_address).split() == ["read", "0"]
        for i in (3, 88, 150):
            assert_same(ds.cache.try_fetch(i), plain_item(i))
    finally:
        ds.cache.close()


def test_a_structured_dtype_keeps_its_fields(ray_address):
    spares = StagedSpares()
    dtype = np.dtype([("flux", np.float32), ("band", "S2")])
    column, _ = spares.take(dtype, (3,), 4)
    column["flux"] = np.arange(12, dtype=np.float32).reshape(4, 3)
    column["band"] = b"gr"
    chunk = Chunk(np.arange(4, dtype=np.int64), None, [StackedColumn(column, False)])
    values, _ = ray.get(
        _read_staged.remote(staged_chunks([chunk], spares), os.getpid()), timeout=60
    )
    assert values.dtype == dtype
    np.testing.assert_array_equal(values, column)


def test_buffers_of_a_lost_insert_are_never_reused(ray_address, cache_name):
    """A staged insert whose call times out may still be read by the actor: not reused."""
    # The cache's actor is started with the default timeout (a worker process's start
    # can take longer than 2 s on a busy machine); this process attaches with 2 s.
    first = raycache.DataCache({"raycache": {"name": cache_name}}, ItemsProvider(64, plain_item))
    first.attach()
    config = {"raycache": {"name": cache_name, "timeout_s": 2.0}}
    ds = CachedDataset(ItemsProvider(64, plain_item), config)
    client = ds.cache.attach()
    pid = ray.get(client.actor.__ray_call__.remote(lambda actor: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGSTOP)  # the actor takes longer than timeout_s to answer
    try:
        ds.__getitems__(list(range(32)))
        ds.cache.flush(timeout=10)
        assert client.dead  # the call timed out: the cache is lost for this process
        assert client.inspect().spare_buffers == []
    finally:
        os.kill(pid, signal.SIGCONT)
    # The actor, awake, stores what it can still read: the items as they were inserted.
    code = f"""
import raycache
from test_batch import ItemsProvider, plain_item
from test_values import assert_same
config = {{"raycache": {{"name": {cache_name!r}}}}}
cache = raycache.DataCache(config, ItemsProvider(64, plain_item))
cache.attach().sync(force=True)
found = [i for i in range(64) if cache.try_fetch(i, wait=False) is not None]
for i in found:
    assert_same(cache.try_fetch(i), plain_item(i))
print(set(found) <= set(range(32)))
cache.close()
"""
    assert run_python(code, ray_address).split() == ["True"]
    ds.cache.close()
    first.close()
    raycache.drop_cache(cache_name)
