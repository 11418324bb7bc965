"""UnitReads and ReaderThreads (raycache.readers): the preload tasks' reader threads.

No Ray here: the reads are plain functions, synchronised with events and barriers.
"""

from __future__ import annotations

import threading
import time

import pytest

from raycache.preload.readers import DRAIN_LEAD_READS, ReaderThreads, UnitReads

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0  # longest any wait in this module may take (they end in ms when all is well)


def reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("raycache-reader-")}


class Abort(BaseException):
    """Not an Exception: the reader threads must record it too."""


def test_results_land_at_their_positions_for_several_units():
    """Each read's return is recorded at its unit and position; every unit ends done."""

    def read(unit: UnitReads, pos: int) -> str:
        unit.builder[pos] = unit.indices[pos] * 10
        return f"{unit.key}:{unit.indices[pos]}"

    layouts = [(0, [0, 1, 2, 3, 4]), (5, [5, 7, 9]), (10, [12]), (20, list(range(20, 37)))]
    with ReaderThreads(read, 3) as readers:
        units = [readers.queue(UnitReads(start, idx, {})) for start, idx in layouts]
        for unit in units:
            assert unit.done.wait(WAIT_S), f"unit {unit.key} never finished"
    for unit, (start, indices) in zip(units, layouts):
        assert unit.results == [f"{start}:{i}" for i in indices]
        assert unit.builder == {p: i * 10 for p, i in enumerate(indices)}


def test_a_unit_is_done_only_after_its_last_read():
    """A unit whose last read is still running is not done; it is once that read ends."""
    last_started, release = threading.Event(), threading.Event()

    def read(unit: UnitReads, pos: int) -> None:
        if unit.key == 0 and pos == 2:
            last_started.set()
            assert release.wait(WAIT_S)
        return None

    with ReaderThreads(read, 2) as readers:
        held = readers.queue(UnitReads(0, [0, 1, 2], None))
        after = readers.queue(UnitReads(3, [3], None))
        assert last_started.wait(WAIT_S)
        # The other thread took `after` once it had finished reads 0 and 1 of `held`.
        assert after.done.wait(WAIT_S)
        assert not held.done.is_set(), "done was set while a read of the unit still ran"
        release.set()
        assert held.done.wait(WAIT_S)
    assert held.results == [None, None, None]


def test_a_failing_read_is_recorded_and_the_unit_still_finishes():
    """A read that raises (an Exception or any BaseException) records the error text."""

    def read(unit: UnitReads, pos: int) -> str | None:
        idx = unit.indices[pos]
        if idx == 2:
            raise ValueError("cannot read item 2")
        if idx == 4:
            raise Abort("stopped at 4")
        return "returned error" if idx == 5 else None

    with ReaderThreads(read, 2) as readers:
        unit = readers.queue(UnitReads(0, [0, 1, 2, 3, 4, 5], None))
        assert unit.done.wait(WAIT_S), "a raising read left its unit unfinished"
        assert unit.results[2] is not None
        assert "ValueError" in unit.results[2] and "cannot read item 2" in unit.results[2]
        assert unit.results[4] is not None
        assert "Abort" in unit.results[4] and "stopped at 4" in unit.results[4]
        assert unit.results[5] == "returned error"
        assert [unit.results[p] for p in (0, 1, 3)] == [None, None, None]
        # The threads go on reading after the failures.
        later = readers.queue(UnitReads(6, [6, 7], None))
        assert later.done.wait(WAIT_S)
        assert later.results == [None, None]


def test_a_unit_without_indices_is_done_at_once():
    """A unit of zero indices is done when built, and queueing it reads nothing."""
    calls = []
    empty = UnitReads(7, [], None)
    assert empty.done.is_set()
    assert empty.results == []
    with ReaderThreads(lambda unit, pos: calls.append(pos), 2) as readers:
        assert readers.queue(empty) is empty
        after = readers.queue(UnitReads(8, [8], None))
        assert after.done.wait(WAIT_S)
    assert calls == [0]  # only the read of the second unit


@pytest.mark.parametrize("threads", [1, 3])
def test_reads_in_flight_reach_but_never_exceed_threads(threads):
    """With enough work, exactly ``threads`` reads run at once, never more."""
    lock = threading.Lock()
    running = peak = 0
    # Each read waits until `threads` reads are running together: with fewer threads
    # the barrier times out (and the read records BrokenBarrierError).
    barrier = threading.Barrier(threads, timeout=WAIT_S)

    def read(unit: UnitReads, pos: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            barrier.wait()
        finally:
            with lock:
                running -= 1

    with ReaderThreads(read, threads) as readers:
        units = [readers.queue(UnitReads(k, list(range(3 * threads)), None)) for k in range(3)]
        for unit in units:
            assert unit.done.wait(2 * WAIT_S)
    assert all(unit.results == [None] * (3 * threads) for unit in units)
    assert peak == threads


def test_close_drops_the_reads_not_started():
    """close() with many reads queued ends the in-flight ones and starts no other."""
    started = []
    lock = threading.Lock()
    both_started, release = threading.Event(), threading.Event()

    def read(unit: UnitReads, pos: int) -> str:
        with lock:
            started.append(pos)
            if len(started) == 2:
                both_started.set()
        release.wait(WAIT_S)
        return "read"

    readers = ReaderThreads(read, 2)
    unit = readers.queue(UnitReads(0, list(range(200)), None))
    assert both_started.wait(WAIT_S)
    closer = threading.Thread(target=readers.close, name="test-closer")
    began = time.monotonic()
    closer.start()
    # close() refuses new units once it has dropped the queue: only then let the two
    # reads in flight end (before that, their threads would take the next reads).
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            readers.queue(UnitReads(500, [], None))
        except RuntimeError:
            break
        assert time.monotonic() < deadline, "close() never marked the threads closed"
        time.sleep(0.001)
    release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive(), "close() did not return"
    assert time.monotonic() - began < WAIT_S
    assert sorted(started) == [0, 1]
    assert unit.results.count("read") == 2
    assert unit.results.count(None) == 198  # dropped, never read
    assert not unit.done.is_set()


def test_queue_after_close_raises():
    """Queueing a unit once the threads are closed raises RuntimeError."""
    with ReaderThreads(lambda unit, pos: None, 2) as readers:
        assert readers.queue(UnitReads(0, [0], None)).done.wait(WAIT_S)
    with pytest.raises(RuntimeError, match="closed"):
        readers.queue(UnitReads(1, [1], None))
    readers.close()  # a second close is harmless


def test_no_reader_thread_outlives_close():
    """The threads (named raycache-reader-*) all end when the context is left."""
    before = reader_threads()
    with ReaderThreads(lambda unit, pos: None, 4) as readers:
        ours = reader_threads() - before
        assert len(ours) == 4
        assert readers.queue(UnitReads(0, list(range(10)), None)).done.wait(WAIT_S)
    assert not any(t.is_alive() for t in ours)
    assert not ours & set(threading.enumerate())
    # Zero threads asked for: one thread still reads, and it ends too.
    with ReaderThreads(lambda unit, pos: None, 0) as readers:
        ours = reader_threads() - before
        assert len(ours) == 1
        assert readers.queue(UnitReads(0, [0, 1], None)).done.wait(WAIT_S)
    assert not ours & set(threading.enumerate())


def test_draining_is_set_when_the_reads_left_to_start_are_within_the_lead():
    """With 2 threads and 10 reads, ``draining`` waits for read 5 to start, not for the end.

    The lead is ``DRAIN_LEAD_READS`` reads per thread: 4 left to start here.
    """
    assert DRAIN_LEAD_READS == 2
    count = 10
    started = [threading.Event() for _ in range(count)]
    release = [threading.Event() for _ in range(count)]

    def read(unit: UnitReads, pos: int) -> None:
        started[pos].set()
        assert release[pos].wait(WAIT_S)

    with ReaderThreads(read, 2) as readers:
        unit = readers.queue(UnitReads(0, list(range(count)), None))
        assert started[0].wait(WAIT_S) and started[1].wait(WAIT_S)
        for pos in range(3):  # reads 2..4 start as earlier ones end: 7..5 left to start
            release[pos].set()
            assert started[pos + 2].wait(WAIT_S)
            assert not unit.draining.is_set()
        release[3].set()
        assert started[5].wait(WAIT_S)
        assert unit.draining.wait(WAIT_S)  # 4 left to start: two reads per thread
        assert not unit.done.is_set()
        for event in release:
            event.set()
        assert unit.done.wait(WAIT_S)
    # A unit within the lead drains at its first read; an empty one at once.
    assert UnitReads(1, [], None).draining.is_set()
    with ReaderThreads(lambda unit, pos: None, 4) as readers:
        small = readers.queue(UnitReads(0, [0, 1, 2], None))
        assert small.draining.wait(WAIT_S) and small.done.wait(WAIT_S)
