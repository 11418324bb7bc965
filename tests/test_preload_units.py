"""The preload scheduler's rules, without Ray: units, give-back and reservations.

``UnitScheduler`` (raycache.preload.units) and ``ReservationPolicy``
(raycache.reservations) take what is cached from a ``missing`` callback and time from a
clock, both injected here: a ``FakeCache`` set of stored indices and a ``FakeClock``.
The tests drive ``claim``/``reserve``/``release``/``registered`` as the directory actor
and the preload tasks would.
"""

from __future__ import annotations

import numpy as np
import pytest

from raycache.chunk import chunk_rows
from raycache.preload.units import (
    MIN_SPLIT_S,
    MIN_UNIT_BYTES,
    MIN_UNIT_ITEMS,
    MIN_UNIT_S,
    PROBE_ITEMS,
    UNITS_PER_SLOT,
    UnitScheduler,
)
from raycache.protocol import HELD, READ_IT, STORED
from raycache.reservations import RESERVE_LEASE_S, ReservationPolicy, Reservations

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeCache:
    """The indices stored so far; ``missing`` is what the directory actor answers."""

    def __init__(self) -> None:
        self.stored: set[int] = set()

    def missing(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if not self.stored:
            return indices
        return indices[~np.isin(indices, list(self.stored))]

    def store(self, indices) -> None:
        self.stored.update(int(i) for i in indices)


def scheduler(length, tasks=1, threads=1, chunk_size=None, chunk_bytes=1 << 20):
    cache, clock = FakeCache(), FakeClock()
    units = UnitScheduler(length, tasks, threads, chunk_size, chunk_bytes, cache.missing, clock)
    return units, cache, clock


def store_unit(units: UnitScheduler, cache: FakeCache, unit: tuple) -> None:
    """A slot read the unit and the actor registered its chunk."""
    key, todo = unit
    cache.store(todo)
    units.registered(key)


def drain(units: UnitScheduler, cache: FakeCache, done=None) -> list[np.ndarray]:
    """Claim and store units until none is left; return each unit's indices."""
    handed = []
    for _ in range(10_000):
        unit = units.claim(done)
        if unit is None:
            return handed
        handed.append(np.asarray(unit[1]))
        store_unit(units, cache, unit)
    raise AssertionError("the scheduler never ran out of units")


NONE = np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------- unit sizes
def test_first_units_are_probes_then_sized_by_the_largest_item_mean():
    """Without chunk_size: PROBE_ITEMS per unit until a unit reports its bytes."""
    units, cache, _ = scheduler(10_000, tasks=2, threads=2, chunk_bytes=64_000)
    first, second = units.claim(None), units.claim(None)
    assert (first[0], second[0]) == (0, 1)  # keys count the units handed out
    assert first[1].tolist() == list(range(PROBE_ITEMS))
    assert second[1].tolist() == list(range(PROBE_ITEMS, 2 * PROBE_ITEMS))
    assert units.unit_rows is None
    store_unit(units, cache, first)
    # 32 items of 1,000 bytes: 64 rows fit chunk_bytes; the next unit holds 64.
    third = units.claim((PROBE_ITEMS, PROBE_ITEMS * 1000, 1.0))
    assert units.unit_rows == 64
    assert third[1].tolist() == list(range(64, 128))
    # A unit of bigger items (2,000 bytes) shrinks the later units; a smaller mean
    # afterwards does not grow them back.
    units.claim((64, 64 * 2000, 1.0))
    assert units.unit_rows == 32 == chunk_rows(None, 64_000, 2000)
    units.claim((64, 64 * 500, 1.0))
    assert units.unit_rows == 32


def test_unit_sizes_shrink_to_a_share_of_what_is_left_but_not_below_the_floor():
    """A chunk's worth while much is left; then a share per slot; MIN_UNIT_ITEMS at least."""
    length, tasks = 4000, 2
    units, cache, _ = scheduler(length, tasks=tasks, threads=2, chunk_size=500)
    sizes = [len(todo) for todo in drain(units, cache)]
    assert sum(sizes) == length
    assert sizes[:2] == [500, 500]  # 4000 / (2 * 2) = 1000 > chunk_size
    expected, start = [], 0
    while start < length:
        left = length - start
        share = -(-left // (tasks * UNITS_PER_SLOT))
        expected.append(min(left, 500, max(share, MIN_UNIT_ITEMS)))
        start += expected[-1]
    assert sizes == expected
    assert min(sizes[:-1]) == MIN_UNIT_ITEMS  # the end is cut into floor-sized units
    assert sizes[-1] <= MIN_UNIT_ITEMS


def test_a_slow_provider_splits_the_last_units_evenly_but_not_below_a_read_per_thread():
    """A slow provider's floor unit takes long (0.16 s here, seconds for slower ones): the
    floor would give one slot all that is left while the others idle, so the end is split
    over the slots instead."""
    units, cache, _ = scheduler(100_000, tasks=4, threads=32, chunk_size=4096)
    store_unit(units, cache, units.claim(None))
    # Nothing came back yet: the pace is unknown, and the floor holds (a share of 13).
    assert units.unit_size(100) == MIN_UNIT_ITEMS
    units.claim((512, 512 * 10, 512 / 400.0))  # 400 rows/s: a floor unit takes 0.16 s
    assert units.unit_size(1000) == 125  # the share: more than a floor per slot is left
    assert units.unit_size(100) == 25  # not 64 for one slot and 36 for another
    assert units.unit_size(20) == 8  # a read for each of a slot's 8 threads
    assert units.unit_size(5) == 5
    # Drained at that pace: once less than a floor per slot is left, each unit takes an
    # even share of it over the slots, down to a read per thread.
    sizes = [len(todo) for todo in drain(units, cache, done=(64, 640, 0.16))]
    assert sum(sizes) == 100_000 - 4096 - 4096
    left = sum(sizes[sizes.index(MIN_UNIT_ITEMS) :])
    for size in sizes[sizes.index(MIN_UNIT_ITEMS) :]:
        if left >= MIN_UNIT_ITEMS * 4:
            assert size == MIN_UNIT_ITEMS
        else:
            assert size == min(left, max(8, -(-left // 4))), (size, left)
        left -= size
    assert sizes[-5:] == [10, 8, 8, 8, 5]
    # One thread per slot: the split stops at MIN_SPLIT_S of reading (a unit's own cost).
    units, cache, _ = scheduler(100_000, tasks=2, threads=2, chunk_size=4096)
    store_unit(units, cache, units.claim(None))
    units.claim((512, 512 * 10, 512 / 400.0))
    least = int(400 * MIN_SPLIT_S)
    assert least == 8 and units.unit_size(30) == 15 and units.unit_size(10) == least


def test_large_items_keep_units_of_min_unit_bytes_however_fast_they_are_read():
    """The time floor would make a fast provider's units of 1 MiB items 100 MiB each."""
    units, cache, _ = scheduler(100_000, tasks=2, threads=8, chunk_size=4096, chunk_bytes=1 << 40)
    store_unit(units, cache, units.claim(None))
    units.claim((4096, 4096 << 20, 4096 / 2000.0))  # 1 MiB items, a floor of 100 rows
    big = MIN_UNIT_BYTES >> 20
    assert units.unit_size(800) == max(800 // (2 * UNITS_PER_SLOT), big)
    assert units.unit_size(40) == big
    assert units.unit_size(10) == 10
    # Small items keep the floor of MIN_UNIT_S reading (fewer chunks: faster shuffled reads).
    small, cache, _ = scheduler(100_000, tasks=2, threads=8, chunk_size=4096, chunk_bytes=1 << 40)
    store_unit(small, cache, small.claim(None))
    small.claim((4096, 4096 * 1024, 4096 / 2000.0))  # 1 KiB items: a floor of 100 rows
    assert small.unit_size(300) == 100  # not the share of 75


def test_a_fast_provider_keeps_units_of_min_unit_s_reading():
    """The floor grows with the pace: MIN_UNIT_S of reading at the last unit's rate."""
    units, cache, _ = scheduler(100_000, tasks=2, threads=2, chunk_size=4096)
    unit = units.claim(None)
    store_unit(units, cache, unit)
    # Before any unit is back the floor is MIN_UNIT_ITEMS: a share of 800 / 4 = 200.
    assert units.unit_size(800) == 200
    rows_per_s = 40_000.0  # 4,096 rows in 0.1024 s
    floor = int(rows_per_s * MIN_UNIT_S)
    assert floor == 2000 > MIN_UNIT_ITEMS
    units.claim((4096, 4096 * 10, 4096 / rows_per_s))
    assert units.unit_size(800) == 800  # all that is left: no unit of less than the floor
    assert units.unit_size(4000) == floor  # the share (1,000) is below the floor
    assert units.unit_size(40) == 40


# ----------------------------------------------------------- ranges and stored items
def test_range_units_leave_out_what_is_stored_and_cover_every_index_once():
    """Stored items are in no unit; every other index is in exactly one."""
    units, cache, _ = scheduler(1000, chunk_size=100)
    cache.store(range(100, 200))  # a whole unit's span: skipped, no empty unit
    cache.store([5, 6, 7])
    handed = drain(units, cache)
    flat = np.concatenate(handed)
    assert len(flat) == len(set(flat.tolist()))
    assert sorted(flat.tolist()) == sorted(set(range(1000)) - set(range(100, 200)) - {5, 6, 7})
    assert all(len(todo) for todo in handed)


def test_inflight_spans_follow_units_until_registered():
    """A range unit is waited on by its span until registered; then by nothing."""
    units, cache, _ = scheduler(1000, chunk_size=100)
    cache.store([3])
    unit = units.claim(None)
    assert units.inflight == {0: 100}  # the span, though index 3 is not read
    assert units.items_left() == 1000 - 100 + 99
    store_unit(units, cache, unit)
    assert units.inflight == {}
    units.registered(unit[0])  # a second give-back changes nothing
    assert units.inflight == {}


def test_lost_units_are_given_back_with_their_indices():
    """Units whose slot ended unreported come back from take_lost; inflight empties."""
    units, _, _ = scheduler(1000, tasks=2, threads=2, chunk_size=100)
    a, b = units.claim(None), units.claim(None)
    lost = units.take_lost()
    assert sorted(todo.tolist() for todo in lost) == sorted([a[1].tolist(), b[1].tolist()])
    assert units.inflight == {}
    assert units.take_lost() == []


def test_a_stopped_scheduler_hands_out_nothing_and_reserves_nothing():
    units, _, _ = scheduler(1000, chunk_size=100)
    units.stopped.set()
    assert units.claim(None) is None
    state, spares = units.reserve("t", np.array([500, 501]), spares=4)
    assert state.tolist() == [READ_IT, READ_IT] and len(spares) == 0
    assert len(units.policy.leases) == 0


# ----------------------------------------------------------------- reservations
def test_reserve_says_held_stored_or_read_it_and_units_skip_reserved_items():
    """Per index: a unit holds it, it is stored, or the trainer reads it (and reserves it)."""
    units, cache, _ = scheduler(1000, chunk_size=100)
    units.claim(None)  # [0, 100) in flight
    cache.store([150])
    state, spares = units.reserve("t", np.array([5, 150, 160, 170]))
    assert state.tolist() == [HELD, STORED, READ_IT, READ_IT]
    assert len(spares) == 0
    assert units.policy.leases.live(0, 1000).tolist() == [160, 170]
    nxt = units.claim(None)
    assert nxt[1].tolist() == [i for i in range(100, 200) if i not in (150, 160, 170)]


def test_misses_beyond_the_share_are_wanted_and_handed_out_before_the_range():
    """A trainer asking for spares reads its share; the rest is the next unit, first."""
    units, _, _ = scheduler(64, threads=4, chunk_size=8)
    first = units.claim(None)  # [0, 8)
    misses = np.arange(63, 7, -1)  # 56 misses, all past the frontier
    state, spares = units.reserve("t", misses, spares=4)
    # Share: max(1, (64 - 8) // (4 + 1), ceil(56 / (4 + 1))) = 12 read by the trainer.
    mine = misses[state == READ_IT]
    assert mine.tolist() == list(range(63, 51, -1))
    held = misses[state == HELD]
    assert sorted(held.tolist()) == list(range(8, 52))
    # It waits for a unit, so it asked for spares: every index past the frontier is its
    # own miss or wanted, and neither is ever a spare.
    assert len(spares) == 0
    # The wanted items are waited on by their run, before any unit holds them.
    assert units.inflight == {0: 8, 8: 52}
    nxt = units.claim(None)
    assert nxt[1].tolist() == list(range(8, 16))  # wanted, in unit_rows pieces
    assert first[0] != nxt[0]
    # Wanted units come first until none is left; then the range skips them all.
    handed = [units.claim(None)[1].tolist() for _ in range(5)]
    assert handed == [list(range(s, s + 8)) for s in range(16, 52, 8)][:4] + [[48, 49, 50, 51]]
    assert units.claim(None) is None  # the range [8, 64) is wanted or reserved


def test_wanted_items_go_out_before_range_items_that_are_free():
    """With range indices still to read, the next unit is the wanted items all the same."""
    units, _, _ = scheduler(200, threads=4, chunk_size=8)
    units.claim(None)  # [0, 8)
    misses = np.arange(199, 149, -1)  # 50 misses at the top
    state, _ = units.reserve("t", misses, spares=1)
    # Share: max(1, (200 - 8) // 5, ceil(50 / 5)) = 38; the last 12 are wanted.
    assert misses[state == HELD].tolist() == list(range(161, 149, -1))
    assert units.claim(None)[1].tolist() == list(range(150, 158))
    assert units.claim(None)[1].tolist() == list(range(158, 162))
    assert units.claim(None)[1].tolist() == list(range(8, 16))  # then the range


def test_range_units_skip_every_index_ever_wanted_even_after_it_was_read():
    """Once wanted, an index is never in a range unit, stored or not."""
    units, cache, _ = scheduler(200, threads=4, chunk_size=16)
    units.claim(None)  # [0, 16)
    misses = np.arange(199, 99, -1)
    state, spares = units.reserve("t", misses, spares=1)
    wanted = set(misses[state == HELD].tolist())
    assert wanted
    assert spares.tolist() == [99]  # the top of what is neither its own nor wanted
    mine = misses[state == READ_IT]
    cache.store(mine)  # the trainer stored its share
    handed = []
    for _ in range(100):
        unit = units.claim(None)
        if unit is None:
            break
        handed.append(unit[1].tolist())
        units.registered(unit[0])  # read and failed, never stored
    flat = [i for todo in handed for i in todo]
    # Wanted ones once each, the rest of the range but the trainer's (misses, spare).
    assert sorted(flat) == sorted(set(range(16, 200)) - set(mine.tolist()) - {99})
    assert wanted <= set(flat)
    assert len(flat) == len(set(flat)), "an ever-wanted index was handed out twice"


def test_a_failed_wanted_item_is_handed_out_once():
    """A wanted item whose unit failed: the trainer may read it, the preload never again."""
    units, cache, clock = scheduler(64, threads=4, chunk_size=8)
    store_unit(units, cache, units.claim(None))  # [0, 8) stored
    misses = np.arange(63, 7, -1)
    state, _ = units.reserve("a", misses, spares=1)
    bad = 40
    assert state[63 - bad] == HELD
    cache.store(misses[state == READ_IT])  # the trainer stored its share
    handed = []
    while True:
        unit = units.claim(None)
        if unit is None:
            break
        handed += unit[1].tolist()
        todo = [i for i in unit[1].tolist() if i != bad]
        cache.store(todo)
        if bad in unit[1].tolist():
            units.note_failed([bad])  # its read failed: the run reports it
        units.registered(unit[0])
    assert handed.count(bad) == 1
    # The trainer's batch needs it: wanted once already, so the trainer reads it itself.
    state, _ = units.reserve("a", np.array([bad]), spares=1)
    assert state.tolist() == [READ_IT]
    units.release("a", np.array([bad]))  # its read failed too
    clock.now += 10 * RESERVE_LEASE_S
    assert units.settle_reserved() is None  # nothing left to read: the failure stands
    assert units.claim(None) is None


def test_spares_come_from_the_top_one_trainer_each():
    """Two trainers get different spares, from the top of what no unit has reached."""
    units, _, _ = scheduler(256, threads=1, chunk_size=8)
    units.claim(None)
    _, a = units.reserve("a", NONE, spares=8)
    _, b = units.reserve("b", NONE, spares=8)
    assert a.tolist() == list(range(255, 247, -1))
    assert b.tolist() == list(range(247, 239, -1))
    assert units.policy.leases.live_count() == 16
    # The range units leave both trainers' spares out while their leases are live.
    handed = [i for todo in drain_range(units) for i in todo]
    assert not set(handed) & set(a.tolist() + b.tolist())


def drain_range(units: UnitScheduler) -> list[list[int]]:
    out = []
    while units.frontier < units.length:  # the range only: stop before leftovers
        unit = units.claim(None)
        if unit is None:
            break
        out.append(unit[1].tolist())
        units.registered(unit[0])
    return out


def test_released_spares_the_range_passed_are_handed_out_after_the_range():
    """Given-back leftovers: released after the units passed them, read at the end."""
    units, cache, _ = scheduler(64, threads=1, chunk_size=8)
    _, spares = units.reserve("a", NONE, spares=4)
    assert spares.tolist() == [63, 62, 61, 60]
    for _ in range(8):  # the whole range, [0, 64) in units of 8
        unit = units.claim(None)
        assert not set(unit[1].tolist()) & set(spares.tolist())
        store_unit(units, cache, unit)
    units.release("b", spares)  # another client's release ends nothing
    assert units.claim(None) is None
    units.release("a", np.array([63, 60]))  # read 62 and 61 itself; gave back 63 and 60
    cache.store([62, 61])
    unit = units.claim(None)
    assert unit is not None and unit[1].tolist() == [60, 63]
    # Picked indices are waited on by their runs: a trainer missing 61 does not wait.
    assert units.inflight == {60: 61, 63: 64}
    store_unit(units, cache, unit)
    assert units.claim(None) is None


def test_reservations_lapse_after_their_lease_and_the_preload_reads_them():
    """A trainer that never stores its items: once the lease ends they become leftovers."""
    units, cache, clock = scheduler(64, threads=1, chunk_size=8)
    state, _ = units.reserve("dead", np.array([30, 31]))
    assert state.tolist() == [READ_IT, READ_IT]
    drain(units, cache)  # the range leaves 30 and 31 out; the leases are live
    assert 30 not in cache.stored and 31 not in cache.stored
    wait = units.settle_reserved()
    assert wait is not None and 0 < wait <= RESERVE_LEASE_S
    clock.now += wait  # the lease ends
    assert units.settle_reserved() == 0.0
    unit = units.claim(None)
    assert unit[1].tolist() == [30, 31]
    store_unit(units, cache, unit)
    assert units.claim(None) is None and units.settle_reserved() is None


def test_stored_reservations_are_forgotten():
    units, cache, _ = scheduler(64, threads=1, chunk_size=8)
    units.reserve("t", np.array([40, 41]))
    cache.store([40, 41])
    assert units.settle_reserved() is None
    assert len(units.policy.leases) == 0


def test_the_lease_covers_the_expected_read_time():
    """RESERVE_LEASE_S plus the reads at a slot's pace (threads_per_task / rows_per_s)."""
    units, cache, clock = scheduler(1000, tasks=1, threads=4, chunk_size=100)
    store_unit(units, cache, units.claim(None))
    units.claim((100, 100 * 10, 1.0))  # 100 rows/s with 4 threads: 0.04 s per item
    units.reserve("t", np.array([900, 901, 902]))
    assert units.settle_reserved() == pytest.approx(RESERVE_LEASE_S + 3 * 0.04)


# ----------------------------------------------------------------- the policy alone
def test_policy_share_of_misses():
    """A trainer's share is the most of: 1, what is left / (threads + 1), its slot's pace."""
    policy = ReservationPolicy(64, threads=4, threads_per_task=4, missing=lambda i: i)
    mine = np.ones(64, dtype=bool)
    later = policy.beyond_share(mine, frontier=0)
    assert later.tolist() == list(range(13, 64))  # ceil(64 / 5) = 13 > 64 // 5 = 12
    assert policy.beyond_share(np.ones(3, dtype=bool), frontier=0).tolist() == []
    mine = np.array([False, True, True, False, True])
    tight = ReservationPolicy(8, threads=8, threads_per_task=8, missing=lambda i: i)
    assert tight.beyond_share(mine, frontier=8).tolist() == [2, 4]  # share 1


def test_policy_spares_are_capped_to_a_share_and_skip_reserved_and_wanted():
    policy = ReservationPolicy(100, threads=1, threads_per_task=1, missing=lambda i: i)
    policy.leases.add("x", np.array([99]), 5.0)
    picked = policy.pick_spares(5, frontier=90, exclude=np.array([97]))
    assert picked.tolist() == [98, 96, 95, 94, 93]  # at most (100 - 90) // (1 + 1) = 5
    assert policy.spare_top == 93
    # Near the frontier the share is 1.
    assert policy.pick_spares(100, 90, np.array([92])).tolist() == [91]


def test_lease_table_release_only_ends_the_clients_own_leases():
    clock = FakeClock()
    table = Reservations(clock)
    table.add("a", np.array([1, 2]), 1.0)
    table.add("b", np.array([3]), 1.0)
    table.release("b", np.array([1, 3]))
    assert sorted(table.live(0, 10).tolist()) == [1, 2]
    assert table.take_expired().tolist() == [3]
    clock.now += 1.0
    assert table.take_expired().tolist() == [1, 2] and len(table) == 0


def test_a_wanted_item_missed_again_is_the_trainers_to_read():
    """Wanted once (its unit failed): a trainer missing it again reads it, no share limit."""
    units, _, _ = scheduler(200, threads=64, chunk_size=8)
    units.claim(None)  # [0, 8)
    first = np.arange(199, 149, -1)
    state, _ = units.reserve("a", first, spares=1)
    # Share: max(1, (200 - 8) // 65, ceil(50 / 65)) = 2.
    assert first[state == READ_IT].tolist() == [199, 198]
    for _ in range(6):  # the wanted units, 150..197; their reads all fail
        key, todo = units.claim(None)
        assert todo.min() >= 150
        units.note_failed(todo.tolist())
        units.registered(key)
    again = np.arange(150, 158)
    state, _ = units.reserve("b", again, spares=1)
    assert state.tolist() == [READ_IT] * 8
