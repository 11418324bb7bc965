"""The choice between torch's pool and one thread for a batch's big copy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raycache.copy_choice import CopyChooser, allowed_threads

MIB = 1 << 20


# What other processes use of this process's CPUs, as the chooser's ``others`` hook:
# these tests decide it rather than read the machine's real load.
def busy():
    return float(os.cpu_count() or 2)  # other processes keep every CPU busy


def idle():
    return 0.0


@pytest.mark.parametrize(
    "torch_threads, cpus, expected",
    [(2, 2, 2), (4, 8, 4), (1, 16, 1), (2, 1, 1), (8, 2, 1), (4, 3, 1)],
)
def test_the_pool_is_used_only_when_it_fits_the_cpus_this_process_may_use(
    torch_threads, cpus, expected
):
    assert allowed_threads(torch_threads, cpus) == expected


def run(chooser, pool_s, one_s, copies):
    """Make ``copies`` copies of 1 MiB that take ``pool_s`` / ``one_s``; return the ways."""
    ways = []
    for _ in range(copies):
        way = chooser.parallel(MIB)
        chooser.record(way, MIB, pool_s if way else one_s)
        ways.append(way)
    return ways


def test_with_one_allowed_thread_every_copy_takes_one_thread():
    chooser = CopyChooser(threads=lambda: 1, others=idle)
    assert run(chooser, pool_s=0.001, one_s=0.01, copies=50) == [False] * 50


def test_a_pool_that_is_slower_is_left_and_tried_less_and_less_often():
    chooser = CopyChooser(probes=3, recheck=8, max_recheck=64, threads=lambda: 2, others=busy)
    ways = run(chooser, pool_s=0.005, one_s=0.001, copies=600)
    learning = ways[:7]  # 3 one-thread copies, then the pool's 3 (+1 that starts it)
    assert learning == [False] * 3 + [True] * 4
    starts = [k for k in range(8, len(ways)) if ways[k] and not ways[k - 1]]
    assert starts, "the pool must be measured again now and then"
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == sorted(gaps) and gaps[-1] <= 64 + 4
    # Only its bursts, each one copy longer than ``probes``: the first wakes the pool.
    assert sum(ways[7:]) == 4 * len(starts)
    assert chooser.snapshot()["in_use"] == "one_thread"


def test_a_pool_that_lost_while_others_hold_the_cpus_is_tried_only_every_max_recheck():
    # Each burst of the pool costs several one-thread copies on a busy node: after
    # learning, it is tried once per ``max_recheck`` copies, not at doubling intervals.
    chooser = CopyChooser(probes=3, recheck=8, max_recheck=200, threads=lambda: 2, others=busy)
    ways = run(chooser, pool_s=0.005, one_s=0.001, copies=1000)
    starts = [k for k in range(8, len(ways)) if ways[k] and not ways[k - 1]]
    assert len(starts) == 4, starts  # at ~207, ~411, ~615, ~819: one per max_recheck
    assert all(g >= 200 for g in (b - a for a, b in zip(starts, starts[1:])))
    unknown = CopyChooser(
        probes=3, recheck=8, max_recheck=200, threads=lambda: 2, others=lambda: None
    )
    starts = [k for k, w in enumerate(run(unknown, 0.005, 0.001, 1000)[8:], 8) if w]
    assert len(starts) > 4 * 4  # load unknown: doubling intervals (8, 16, ...), as before


def test_a_node_seen_quiet_has_its_pool_tried_again_without_waiting_for_max_recheck():
    load = {"others": busy()}
    chooser = CopyChooser(
        probes=3, recheck=8, max_recheck=10_000, threads=lambda: 2, others=lambda: load["others"]
    )
    assert run(chooser, pool_s=0.005, one_s=0.001, copies=100)[10:].count(True) == 0
    load["others"] = 0.0  # the other processes have gone
    quiet = run(chooser, pool_s=0.0005, one_s=0.001, copies=30)
    assert quiet[:2] == [True, True] and chooser.snapshot()["in_use"] == "pool"


def test_a_pool_that_is_faster_is_kept():
    chooser = CopyChooser(probes=3, recheck=8, max_recheck=64, threads=lambda: 2, others=busy)
    ways = run(chooser, pool_s=0.001, one_s=0.002, copies=200)
    assert ways[20:].count(False) < 20
    assert chooser.snapshot()["in_use"] == "pool"


@pytest.mark.parametrize("others", [busy, lambda: None])
def test_a_pool_only_slightly_faster_is_not_taken_where_others_use_the_cpus(others):
    # Within the margin the pool's gain is small and its risk on a busy node is not;
    # a load that cannot be read (None) counts as busy.
    chooser = CopyChooser(probes=3, recheck=8, margin=0.8, threads=lambda: 2, others=others)
    ways = run(chooser, pool_s=0.0019, one_s=0.002, copies=100)
    assert chooser.snapshot()["in_use"] == "one_thread" and ways[-1] is False


@pytest.mark.parametrize("others", [idle, lambda: 0.2])
def test_a_pool_only_slightly_faster_is_taken_where_the_cpus_are_idle(others):
    chooser = CopyChooser(probes=3, recheck=8, margin=0.8, threads=lambda: 2, others=others)
    ways = run(chooser, pool_s=0.0019, one_s=0.002, copies=100)
    assert chooser.snapshot()["in_use"] == "pool" and ways[-20:].count(True) >= 15


def test_a_slower_pool_is_not_taken_even_where_the_cpus_are_idle():
    chooser = CopyChooser(probes=3, recheck=8, threads=lambda: 2, others=idle)
    ways = run(chooser, pool_s=0.0021, one_s=0.002, copies=100)
    assert chooser.snapshot()["in_use"] == "one_thread" and ways[-1] is False


def test_the_copy_that_wakes_the_pool_is_not_counted():
    # Waking the pool's threads after one-thread copies costs that one copy much more
    # than a copy while the pool is in use; counted, it hides a pool 2x faster.
    chooser = CopyChooser(probes=3, recheck=8, threads=lambda: 2, others=busy)
    last = False
    for _ in range(100):
        way = chooser.parallel(MIB)
        chooser.record(way, MIB, (0.02 if not last else 0.001) if way else 0.002)
        last = way
    assert chooser.snapshot()["in_use"] == "pool"
    assert chooser.snapshot()["pool"]["s_per_mib"] < 0.0015


def test_one_lucky_pool_copy_does_not_switch_to_the_pool():
    chooser = CopyChooser(probes=4, recheck=8, threads=lambda: 2, others=busy)
    run(chooser, pool_s=0.01, one_s=0.002, copies=60)
    # A burst: the copy that wakes the pool (not counted), one fast copy, three slow.
    times = iter([0.01, 0.0001, 0.01, 0.01, 0.01] * 100)
    for _ in range(200):
        way = chooser.parallel(MIB)
        chooser.record(way, MIB, next(times) if way else 0.002)
    assert chooser.snapshot()["in_use"] == "one_thread"


def test_a_node_that_becomes_busy_or_quiet_again_changes_the_choice():
    chooser = CopyChooser(probes=3, recheck=8, max_recheck=32, threads=lambda: 2, others=busy)
    run(chooser, pool_s=0.001, one_s=0.002, copies=50)  # quiet: the pool
    loaded = run(chooser, pool_s=0.010, one_s=0.002, copies=100)
    assert loaded[-50:].count(True) <= 8  # busy: one thread, bar a burst of the pool
    quiet = run(chooser, pool_s=0.001, one_s=0.002, copies=100)
    assert quiet[-50:].count(True) >= 40  # quiet again: the pool, bar bursts of one thread


def test_forced_way_is_taken_unmeasured():
    chooser = CopyChooser(threads=lambda: 1, others=idle)
    chooser.forced = True
    assert run(chooser, pool_s=1.0, one_s=0.001, copies=5) == [True] * 5
    chooser.forced = None
    chooser.reset()
    assert chooser.snapshot()["pool"]["samples"] == 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_a_process_pinned_to_one_cpu_never_takes_the_pool():
    # As under taskset or a job scheduler that pins the trainer: torch was told 2 threads.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "import torch; torch.set_num_threads(2)\n"
        "from raycache.copy_choice import CHOOSER, allowed_threads\n"
        "print(allowed_threads(), [CHOOSER.parallel(1 << 22) for _ in range(5)])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[0] == "1 [False, False, False, False, False]"


def _samples_in_child(queue):
    from raycache.copy_choice import CHOOSER

    seen = CHOOSER.snapshot()
    queue.put((seen["pool"]["samples"], seen["one_thread"]["samples"]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_measures_for_itself():
    import multiprocessing

    from raycache.copy_choice import CHOOSER

    CHOOSER.reset()
    for way in (True, False, True, False):
        CHOOSER.record(way, MIB, 0.001)
    assert CHOOSER.snapshot()["one_thread"]["samples"] == 2
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_samples_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == (0, 0)
    finally:
        child.join(timeout=60)
    CHOOSER.reset()
