"""A preload read that never returns: given up on after the item timeout, without Ray.

``ReaderThreads.wait`` records a read running over the limit as failed, starts another
reader in its thread's place so the unit's other reads go on, ignores the stuck read's
result when it finally comes, and closing does not wait for the stuck thread.
"""

from __future__ import annotations

import threading
import time

from raycache.preload.readers import ReaderThreads, UnitReads

WAIT_S = 30.0


def test_a_stuck_read_times_out_and_the_unit_finishes_without_it():
    release = threading.Event()
    done_late = threading.Event()

    def read(unit: UnitReads, pos: int) -> str | None:
        if unit.indices[pos] == 5:
            release.wait(WAIT_S)  # stuck until the test lets it go
            done_late.set()
            return None  # a success that comes too late to count
        return None

    readers = ReaderThreads(read, 2)
    try:
        unit = readers.queue(UnitReads(0, list(range(20)), builder=None))
        start = time.monotonic()
        waiter = threading.Thread(target=readers.wait, args=(unit.done, 0.3))
        waiter.start()
        waiter.join(WAIT_S)
        assert not waiter.is_alive(), "the unit never finished"
        assert time.monotonic() - start < 10
        assert unit.timed_out == [5]
        assert unit.results[5] is not None and "TimeoutError" in unit.results[5]
        assert "reading index 5" in unit.results[5]
        assert [r for p, r in enumerate(unit.results) if p != 5] == [None] * 19
        # Later units still get two readers: the stuck one was replaced.
        second = readers.queue(UnitReads(1, list(range(100, 110)), builder=None))
        assert second.done.wait(WAIT_S)
        release.set()
        assert done_late.wait(WAIT_S)
        assert "TimeoutError" in unit.results[5]  # the late success did not overwrite it
    finally:
        release.set()
        start = time.monotonic()
        readers.close()
        assert time.monotonic() - start < 10


def test_close_does_not_wait_for_a_read_that_never_returns():
    never = threading.Event()

    def read(unit: UnitReads, pos: int) -> str | None:
        never.wait(3600)
        return None

    readers = ReaderThreads(read, 1)
    unit = readers.queue(UnitReads(0, [0, 1], builder=None))
    readers.wait(unit.done, 0.2)  # both reads time out, one after the other
    assert sorted(unit.timed_out) == [0, 1]
    start = time.monotonic()
    readers.close()
    assert time.monotonic() - start < 5
    never.set()
