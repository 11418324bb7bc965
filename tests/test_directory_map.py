"""The directory's map, event log, dedup and compaction, and the wire records: no Ray.

``ChunkMap`` and ``ClientTable`` hold no Ray call (the actor does the ``ray.put``s), so
they are tested here with plain strings standing in for object references.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from raycache.directory_clients import ClientTable
from raycache.directory_map import MERGED_CHUNK_BYTES, SNAPSHOT_AFTER, ChunkMap
from raycache.protocol import (
    MISSING,
    AddEvent,
    Events,
    InsertResult,
    RetireEvent,
    Snapshot,
    chunk_ids,
    held_by_units,
    pack_locations,
    rows,
    unit_holding,
)


def new_map(length=100, max_bytes=10**9, chunk_rows=8, chunk_bytes=10**6) -> ChunkMap:
    return ChunkMap(length, max_bytes, chunk_rows, chunk_bytes)


def idx(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def apply(loc: np.ndarray, reply) -> np.ndarray:
    """What a client's map holds after a reply (the client's rule, restated)."""
    if isinstance(reply, Snapshot):
        return np.where(reply.chunk_of >= 0, pack_locations(reply.chunk_of, reply.row_of), MISSING)
    loc = loc.copy()
    for event in reply.events:
        if isinstance(event, AddEvent):
            loc[event.indices] = pack_locations(event.cid, event.rows)
    return loc


def test_register_maps_indices_to_rows_and_logs_one_event():
    m = new_map()
    cid, added = m.register("ref-a", idx(5, 7, 9), nbytes=300)
    assert (cid, added) == (0, 3)
    assert m.is_cached(7) and not m.is_cached(6)
    np.testing.assert_array_equal(m.cached(idx(5, 6, 9)), [True, False, True])
    assert (m.items, m.nbytes, m.version) == (3, 300, 1)
    (event,) = m.events
    assert isinstance(event, AddEvent) and event.cid == 0
    np.testing.assert_array_equal(event.indices, [5, 7, 9])
    np.testing.assert_array_equal(event.rows, [0, 1, 2])
    np.testing.assert_array_equal(m.missing(idx(4, 5, 6)), [4, 6])


def test_same_index_twice_in_one_chunk_keeps_the_first_row():
    m = new_map()
    np.testing.assert_array_equal(m.new_positions(idx(3, 4, 3, 5)), [0, 1, 3])
    _, added = m.register("ref", idx(3, 4, 3, 5), nbytes=40)
    assert added == 3 and m.items == 3
    assert (m.chunk_of[3], m.row_of[3]) == (0, 0)


def test_an_index_already_cached_keeps_its_first_value():
    m = new_map()
    m.register("first", idx(1, 2), nbytes=20)
    np.testing.assert_array_equal(m.new_positions(idx(2, 3)), [1])
    cid, added = m.register("second", idx(2, 3), nbytes=20)
    assert added == 1 and m.items == 3
    assert m.chunk_of[2] == 0 and m.chunk_of[3] == cid
    # Every position cached already: nothing worth storing.
    assert len(m.new_positions(idx(1, 2, 3))) == 0


def test_byte_budget_counts_the_rows_left_out():
    m = new_map(max_bytes=250)
    m.register("a", idx(0, 1), nbytes=200)
    assert m.rows_that_fit(nbytes=100, count=4) == 2  # 25 B a row, 50 B of room
    assert m.rejected == 2
    assert m.rows_that_fit(nbytes=40, count=2) == 2  # fits whole: nothing rejected
    assert m.rejected == 2


def test_small_segments_are_handed_back_once_they_would_fill_a_chunk():
    m = new_map(chunk_rows=8)
    due = []
    for start in range(0, 8, 2):  # four segments of 2 rows: the fourth completes 8
        cid, _ = m.register(f"seg{start}", idx(start, start + 1), nbytes=20)
        due = m.note_segment(cid)
        if start < 6:
            assert due == []
    assert due == [0, 1, 2, 3]
    big, _ = m.register("big", np.arange(10, 18), nbytes=80)
    assert m.note_segment(big) == []  # a full chunk is no segment


def test_segments_are_merged_into_chunks_of_at_most_the_merge_size():
    # Merging writes each byte twice and leaves the last merged segments' store pages
    # resident: up to one merged chunk above the data. Chunks of 64 MiB, items of 1 MiB.
    mib = 1 << 20
    m = new_map(length=1000, chunk_rows=1000, chunk_bytes=64 * mib)
    half = MERGED_CHUNK_BYTES // 2
    for start in range(0, 40, 8):  # segments of half the merge size: kept as they are
        cid, _ = m.register(f"seg{start}", np.arange(start, start + 8), half)
        assert m.note_segment(cid) == []
    due, merged = [], []
    for start in range(100, 300, 4):  # smaller ones: gathered up to the merge size
        cid, _ = m.register(f"small{start}", np.arange(start, start + 4), 4 * mib)
        due = m.note_segment(cid)
        if due:
            merged.append(due)
    sizes = [sum(m.sizes[c][1] for c in cids) for cids in merged]
    assert len(merged) == 50 * 4 * mib // MERGED_CHUNK_BYTES
    assert all(size == MERGED_CHUNK_BYTES for size in sizes)
    # Chunks smaller than the merge size: half a chunk is the bound, as before.
    m = new_map(chunk_rows=1000, chunk_bytes=1000)
    cid, _ = m.register("half", idx(0, 1), nbytes=500)
    assert m.note_segment(cid) == []


def test_compaction_moves_indices_and_retires_the_segments():
    m = new_map(chunk_rows=4)
    m.register("s0", idx(0, 1), nbytes=20)
    m.register("s1", idx(2, 3), nbytes=20)
    items, before = m.items, m.version
    merged, moved = m.register("merged", idx(0, 1, 2, 3), nbytes=40, replace=True)
    m.retire([0, 1])
    assert moved == 4 and m.items == items  # moved, not newly cached
    assert set(m.refs) == {merged} and m.nbytes == 40
    np.testing.assert_array_equal(m.chunk_of[:4], [merged] * 4)
    np.testing.assert_array_equal(m.row_of[:4], [0, 1, 2, 3])
    reply = m.reply(before, None)
    assert isinstance(reply, Events) and reply.version == before + 2
    assert isinstance(reply.events[0], AddEvent) and reply.events[1] == RetireEvent([0, 1])
    assert set(reply.refs) == {merged}


def test_events_reply_holds_only_what_changed_and_its_refs():
    m = new_map()
    m.register("a", idx(0, 1), nbytes=20)
    m.register("b", idx(2), nbytes=10)
    reply = m.reply(1, {40: 48})
    assert isinstance(reply, Events)
    assert reply.version == 2 and len(reply.events) == 1
    assert reply.refs == {1: "b"} and reply.inflight == {40: 48}
    assert m.reply(2, None) == Events(2, [], {}, None)


def test_new_or_far_behind_clients_get_a_snapshot_and_both_replies_agree():
    m = new_map(length=2000)
    for i in range(SNAPSHOT_AFTER + 5):
        m.register(f"r{i}", idx(i), nbytes=8)
    first = m.reply(0, None)
    assert isinstance(first, Snapshot) and first.version == m.version
    assert len(first.refs) == SNAPSHOT_AFTER + 5
    assert isinstance(m.reply(4, None), Snapshot)  # more than SNAPSHOT_AFTER behind
    near = m.reply(10, None)
    assert isinstance(near, Events)
    # A client at version 10 that applies the events ends with the snapshot's map.
    at_10 = apply(np.full(2000, MISSING, np.int64), m.reply(0, None))
    at_10[10:] = MISSING
    np.testing.assert_array_equal(apply(at_10, near), apply(at_10, first))
    # An empty map has nothing to send a new client.
    assert isinstance(new_map().reply(0, None), Events)


def test_clear_retires_everything():
    m = new_map()
    m.register("a", idx(0, 1), nbytes=20)
    m.clear()
    assert m.items == 0 and m.nbytes == 0 and not m.refs
    assert not m.cached(idx(0, 1)).any()
    assert isinstance(m.events[-1], RetireEvent) and m.events[-1].cids == [0]


def test_footprint_counts_map_and_event_log_bytes():
    m = new_map(length=1000)
    m.register("a", np.arange(10), nbytes=80)
    info = m.footprint()
    assert info["map_bytes"] == 8000 and info["events"] == 1 and info["chunks"] == 1
    assert info["event_log_bytes"] == 10 * 8 + 10 * 4  # int64 indices, int32 rows


def test_client_table_forgets_silent_clients_and_knows_when_idle():
    table = ClientTable()
    table.attach("a", {"pid": 1}, now=100.0)
    table.attach("b", {"pid": 2}, now=100.0)
    assert table.idle_for(200.0) == 0.0
    table.seen("a", now=125.0, hits=3, misses=1)
    assert table.silent(now=131.0, timeout=30.0) == ["b"]
    assert (table.hits, table.misses) == (3, 1)
    table.detach("a", now=140.0)
    assert not table.info and table.idle_for(150.0) == pytest.approx(10.0)


def test_locations_pack_and_unpack_whole_arrays():
    cids, rws = np.array([0, 3, 2**31 - 1]), np.array([5, 0, 2**31 - 1])
    loc = pack_locations(cids, rws)
    assert loc.dtype == np.int64 and (loc >= 0).all()
    np.testing.assert_array_equal(chunk_ids(loc), cids)
    np.testing.assert_array_equal(rows(loc), rws)
    assert (chunk_ids(int(loc[1])), rows(int(loc[1]))) == (3, 0)


def test_in_flight_units_are_found_by_one_rule():
    inflight = {0: 10, 20: 25}
    assert unit_holding(inflight, 9) == 0 and unit_holding(inflight, 20) == 20
    assert unit_holding(inflight, 10) is None and unit_holding(inflight, 25) is None
    held = held_by_units(inflight, idx(0, 10, 22, 30))
    np.testing.assert_array_equal(held, [True, False, True, False])
    held = held_by_units(inflight, idx(0, 22), skip={20})
    np.testing.assert_array_equal(held, [True, False])


def test_replies_pickle_and_tell_news_from_elsewhere():
    events = Events(3, [AddEvent(0, idx(1), np.zeros(1, np.int32))], {0: "r"}, {5: 9})
    assert pickle.loads(pickle.dumps(events)).events[0].cid == 0
    assert not InsertResult(1, 0, events, own_events=1).news_from_elsewhere()
    assert InsertResult(1, 0, events, own_events=0).news_from_elsewhere()
    snapshot = Snapshot(3, np.zeros(2, np.int32), np.zeros(2, np.int32), {}, None)
    assert InsertResult(1, 0, snapshot, own_events=5).news_from_elsewhere()
