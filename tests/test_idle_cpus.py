"""What other processes use of this process's CPUs (``raycache.idle_cpus``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raycache.idle_cpus import OthersLoad, busy_seconds

STAT = """cpu  900 0 300 5000 10 0 0 0 0 0
cpu0 100 0 50 2000 5 0 0 0 0 0
cpu1 200 10 40 1000 5 1 2 3 7 0
cpu2 999 0 0 0 0 0 0 0 0 0
intr 12345
"""


def test_busy_seconds_adds_the_busy_ticks_of_the_given_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    tick = os.sysconf("SC_CLK_TCK")
    # cpu0: 100 + 50; cpu1: 200 + 10 + 40 + 1 + 2 + 3 (guest time is in user already).
    assert busy_seconds({0, 1}, str(stat)) == pytest.approx((150 + 256) / tick)
    assert busy_seconds({7}, str(stat)) is None
    assert busy_seconds({0}, str(tmp_path / "absent")) is None


class Clocks:
    """Fake busy, own and wall clocks that a test moves by hand."""

    def __init__(self):
        self.busy = 100.0
        self.own = 5.0
        self.wall = 1000.0

    def load(self, window=0.25):
        return OthersLoad(window, lambda: self.busy, lambda: self.own, lambda: self.wall)


def test_others_load_discounts_this_process_and_waits_for_a_long_enough_window():
    c = Clocks()
    load = c.load()
    assert load.sample() is None  # no interval has ended yet
    c.wall += 0.1
    c.busy += 0.2
    assert load.sample() is None  # too short: the figure would be mostly rounding
    c.wall += 0.4  # 0.5 s since the start: 0.2 + 0.8 busy seconds, 0.6 of them ours
    c.busy += 0.8
    c.own += 0.6
    assert load.sample() == pytest.approx(0.8)
    c.wall += 0.1
    assert load.sample() == pytest.approx(0.8)  # the latest figure until the next
    c.wall += 0.4
    c.own += 1.0  # only this process ran: our threads spinning are not others' load
    c.busy += 1.0
    assert load.sample() == pytest.approx(0.0)
    c.wall += 1.0
    c.own += 0.5  # own time ahead of the CPUs' tick accounting: never below zero
    assert load.sample() == 0.0


def test_others_load_without_proc_stat_says_nothing():
    load = OthersLoad(0.0, busy=lambda: None)
    assert load.sample() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_a_process_spinning_on_a_cpu_is_seen_as_others_load():
    # A second process keeps one CPU of this process's affinity busy for a while.
    spin = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass\n"
    cpu = min(os.sched_getaffinity(0))
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(proc.pid, {cpu})
        load = OthersLoad(min_window_s=1.0)
        proc.wait(timeout=1.2)
    except subprocess.TimeoutExpired:
        seen = load.sample()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # At least the share of its CPU the spinner got; on a loaded machine others add more.
    assert seen is not None and seen >= 0.25
