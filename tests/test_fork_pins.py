"""``ChildPins``: retired chunks are held exactly while a child forked with them lives."""

from __future__ import annotations

from raycache.fork_pins import ChildPins


def test_a_retired_chunk_is_held_until_every_child_that_mapped_it_exits():
    pins = ChildPins()
    pins.preparing([1, 2])
    pins.forked(10)
    pins.preparing([2, 3])
    pins.forked(11)
    for cid in (1, 2, 3, 4):
        pins.retire(cid, f"ref{cid}", f"view{cid}")
    assert pins.held == 3  # chunk 4 was mapped by no child
    pins.exited(10)
    assert pins.held == 2  # 2 and 3: child 11 still maps them
    pins.exited(11)
    assert (pins.held, pins.children) == (0, 0)


def test_a_child_forked_after_a_retire_does_not_hold_it_and_unknown_exits_are_ignored():
    pins = ChildPins()
    pins.retire(1, "ref", "view")
    pins.preparing([2])
    pins.forked(5)
    assert pins.held == 0
    pins.exited(99)
    assert pins.children == 1
    pins.exited(5)
    pins.exited(5)
    assert pins.children == 0


def test_a_chunk_retired_between_the_preparation_and_the_fork_is_held_for_the_child():
    pins = ChildPins()
    pins.preparing([7])
    pins.retire(7, "ref", "view")  # the map changed before the fork happened
    assert pins.held == 1
    pins.forked(3)
    assert pins.held == 1
    pins.exited(3)
    assert pins.held == 0
    pins.preparing([8])
    pins.retire(8, "ref", "view")
    pins.forked(None)  # the fork was not prepared after all: nothing to keep
    assert (pins.held, pins.children) == (0, 0)
