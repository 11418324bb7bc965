"""``SpanTable``: a batch over many chunks copied one column at a time, exactly."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from raycache.batch import gather
from raycache.chunk import Chunk
from raycache.gathered import collate
from raycache.protocol import pack_locations
from raycache.span_table import SpanTable

POINT = np.dtype([("x", "<f4"), ("flag", "u1")])  # 5 bytes: rows at odd addresses


def item(i, scale=1):
    point = np.zeros((), POINT)
    point["x"], point["flag"] = i * 0.5, i % 256
    return {
        "image": np.full((3, 5), i * scale, dtype=np.float32),
        "code": np.arange(7, dtype=np.uint8) + i % 200,  # 7-byte rows
        "point": point,
        "label": i * scale,
        "weight": i / 8,
        "name": f"obj-{i}",
    }


def chunks_of(n, per_chunk, scale=1, first_cid=0):
    chunks, where = {}, {}
    for c, start in enumerate(range(0, n, per_chunk), start=first_cid):
        indices = list(range(start, min(n, start + per_chunk)))
        chunks[c] = Chunk.from_rows(indices, [item(i, scale) for i in indices])
        where.update({i: (c, r) for r, i in enumerate(indices)})
    return chunks, where


def locations(where, idx):
    return pack_locations([where[i][0] for i in idx], [where[i][1] for i in idx])


def assert_batch(batch, idx, scale=1):
    assert len(batch) == len(idx)
    for got, i in zip(batch, idx):
        want = item(int(i), scale)
        assert np.array_equal(got["image"], want["image"]) and got["image"].dtype == np.float32
        assert np.array_equal(got["code"], want["code"])
        assert got["point"] == want["point"] and got["point"].dtype == POINT
        assert got["label"] == want["label"] and got["weight"] == want["weight"]
        assert got["name"] == want["name"]


def test_shuffled_batches_over_many_chunks_are_exact():
    chunks, where = chunks_of(300, 23)
    table = SpanTable()
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = rng.permutation(300)[:64]
        loc = locations(where, idx)
        batch = gather({c: chunks[c] for c in np.unique(loc >> 32).tolist()}, loc, table)
        assert_batch(batch, idx)
        plain = gather({c: chunks[c] for c in np.unique(loc >> 32).tolist()}, loc)
        assert_batch(plain, idx)


def test_columns_are_private_copies():
    chunks, where = chunks_of(100, 10)
    idx = np.arange(0, 100, 7)
    loc = locations(where, idx)
    batch = gather(chunks, loc, SpanTable())
    collated = collate(batch)
    assert collated["image"].shape == (len(idx), 3, 5)
    collated["image"].fill_(-1)
    collated["label"].fill_(-1)
    for got in batch:
        got["code"][:] = 0
    assert_batch(gather(chunks, loc, SpanTable()), idx)  # the chunks are unchanged


def test_a_chunk_id_that_now_names_another_chunk_is_read_from_the_new_chunk():
    table = SpanTable()
    old, where = chunks_of(60, 10)
    idx = np.arange(60)[::-1]
    loc = locations(where, idx)
    assert_batch(gather(old, loc, table), idx)
    new, where = chunks_of(60, 10, scale=3)  # same chunk ids, other objects and values
    del old
    assert_batch(gather(new, loc, table), idx, scale=3)


def test_chunks_of_another_layout_under_one_table():
    table = SpanTable()
    chunks, where = chunks_of(40, 8)
    idx = np.arange(40)
    assert_batch(gather(chunks, locations(where, idx), table), idx)
    other = {
        c: Chunk.from_rows(
            list(range(c * 8, c * 8 + 8)), [{"v": np.full(4, c * 8 + r, "<i8")} for r in range(8)]
        )
        for c in range(5)
    }
    loc = pack_locations(np.repeat(np.arange(5), 8), np.tile(np.arange(8), 5))
    batch = gather(other, loc, table)
    assert [int(b["v"][0]) for b in batch] == list(range(40))


def test_a_row_out_of_its_chunk_is_refused_and_nothing_is_read():
    chunks, where = chunks_of(40, 8)
    loc = locations(where, [0, 9, 17])
    loc[1] = pack_locations(1, 8)  # chunk 1 has rows 0..7
    with pytest.raises(IndexError, match="row 8 is out of range of its chunk"):
        gather(chunks, loc, SpanTable())


def test_threads_sharing_a_table_over_different_chunks_read_exactly():
    table = SpanTable()
    sets = [chunks_of(120, 9), chunks_of(120, 13, scale=5)]  # same ids, other chunks
    errors = []

    def reader(k):
        chunks, where = sets[k % 2]
        rng = np.random.default_rng(k)
        try:
            for _ in range(30):
                idx = rng.permutation(120)[:32]
                assert_batch(gather(chunks, locations(where, idx), table), idx, 1 + 4 * (k % 2))
        except Exception as exc:  # reported below, with the thread's number
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
