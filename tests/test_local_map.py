"""A client's map applies the actor's replies as the actor's map holds them: no Ray.

``LocalMap.apply`` and the write buffer's segments make no Ray call, so they are tested
here against a ``ChunkMap`` (the actor's side) with strings for object references.
"""

from __future__ import annotations

import numpy as np

from raycache.chunk import flatten_checked
from raycache.chunk_builder import ColumnSpares
from raycache.client.link import LOST, ActorLink
from raycache.client.local_map import LocalMap
from raycache.client.write_buffer import Segment
from raycache.directory_map import ChunkMap
from raycache.fork_pins import ChildPins
from raycache.protocol import MISSING, Events, Snapshot, pack_locations


def pair(length=50):
    actor_map = ChunkMap(length, 10**9, chunk_rows=4, chunk_bytes=10**6)
    pins = ChildPins()
    link = ActorLink(None, "client-1", "t", timeout=1.0)
    return actor_map, LocalMap(link, length, pins, counts=lambda: (0, 0)), pins


def expected(actor_map: ChunkMap) -> np.ndarray:
    cached = actor_map.chunk_of >= 0
    return np.where(cached, pack_locations(actor_map.chunk_of, actor_map.row_of), MISSING)


def test_events_and_snapshots_leave_the_actors_map():
    actor_map, local, _ = pair()
    actor_map.register("a", np.array([3, 4]), nbytes=16)
    first = actor_map.reply(local.version, None)
    assert isinstance(first, Snapshot)
    local.apply(first, asked=1.0)
    np.testing.assert_array_equal(local.loc, expected(actor_map))
    assert local.refs == {0: "a"} and local.version == 1
    actor_map.register("b", np.array([5, 3]), nbytes=16)  # 3 keeps its first place
    news = actor_map.reply(local.version, {10: 20})
    assert isinstance(news, Events)
    local.apply(news, asked=2.0)
    np.testing.assert_array_equal(local.loc, expected(actor_map))
    assert local.preloading and local.inflight == {10: 20}
    assert local.changed_elsewhere and local.last_sync == 2.0


def test_an_older_reply_arriving_late_is_dropped():
    actor_map, local, _ = pair()
    actor_map.register("a", np.array([1]), nbytes=8)
    old = actor_map.reply(0, None)
    actor_map.register("b", np.array([2]), nbytes=8)
    local.apply(actor_map.reply(0, None), asked=2.0)
    local.apply(old, asked=1.0)
    assert local.version == 2 and local.loc[2] >= 0


def test_retired_chunks_go_to_the_fork_pins_while_a_child_can_read_them():
    actor_map, local, pins = pair()
    actor_map.register("s0", np.array([0, 1]), nbytes=16)
    actor_map.register("s1", np.array([2, 3]), nbytes=16)
    local.apply(actor_map.reply(0, None), asked=1.0)
    local.views = {0: "view-0", 1: "view-1"}  # as if mapped
    pins.preparing(local.views)
    pins.forked(7)  # a child that can read chunks 0 and 1
    merged, _ = actor_map.register("m", np.array([0, 1, 2, 3]), nbytes=32, replace=True)
    actor_map.retire([0, 1])
    local.apply(actor_map.reply(local.version, None), asked=2.0)
    np.testing.assert_array_equal(local.loc, expected(actor_map))
    assert set(local.refs) == {merged} and not local.views
    assert pins.held == 2
    pins.exited(7)
    assert pins.held == 0


def test_a_lost_link_answers_lost_without_calling_ray():
    link = ActorLink(None, "client-1", "t", timeout=1.0)
    link.lost(RuntimeError("gone"))
    assert link.dead and not link.usable()
    assert link.get(LOST) is LOST


def test_a_segment_keeps_the_first_row_of_each_index_and_reads_back_copies():
    segment = Segment(rows=4, max_bytes=10**6, spares=ColumnSpares())
    item = {"x": np.arange(3.0), "label": 7}
    for idx in (5, 9):
        leaves: list = []
        segment.add(idx, item, (flatten_checked(item, leaves), leaves))
    back = segment.item(9)
    back["x"][0] = -1.0
    assert segment.item(9)["x"][0] == 0.0 and segment.item(9)["label"] == 7
    chunk = segment.chunk()
    np.testing.assert_array_equal(chunk.indices, [5, 9])
    assert not segment.full()
