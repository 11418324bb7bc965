"""A thread's CPU time and its wait for a CPU (``raycache.thread_clock``), on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from raycache.thread_clock import cpu_and_wait

LINUX = os.path.exists("/proc/thread-self/schedstat")


def _spin(cpu_s: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < cpu_s:
        pass


def _wait_running(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has used 0.05 s of CPU (its interpreter is up)."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while sum(proc.cpu_times()[:2]) < 0.05:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} used no CPU in {timeout} s")
        time.sleep(0.01)


def test_cpu_is_this_threads_and_a_sleep_adds_none():
    cpu, waited = cpu_and_wait()
    began = time.thread_time()
    _spin(0.05)
    spun = time.thread_time() - began
    after, waited_after = cpu_and_wait()
    assert abs((after - cpu) - spun) < 0.01, (after - cpu, spun)
    assert waited_after >= waited
    time.sleep(0.05)
    slept, _ = cpu_and_wait()
    assert slept - after < 0.01


@pytest.mark.skipif(not LINUX, reason="run-queue wait is counted by Linux only")
def test_a_thread_sharing_its_cpu_counts_the_wait():
    """Pinned to one CPU with a process that spins there, half the wall time is a wait."""
    cpu_id = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    # It ends by itself within 60 s should this test die before it kills it.
    spin = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
    hog = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(hog.pid, {cpu_id})
        os.sched_setaffinity(0, {cpu_id})
        _wait_running(hog.pid)
        wall, (cpu, waited) = time.perf_counter(), cpu_and_wait()
        _spin(0.2)
        wall = time.perf_counter() - wall
        cpu_now, waited_now = cpu_and_wait()
    finally:
        os.sched_setaffinity(0, mine)
        hog.kill()
        hog.wait(timeout=30)
    waited = waited_now - waited
    # The share a read would compute: CPU over the wall time less the wait.
    assert waited >= 0.25 * wall, (waited, wall)
    assert (cpu_now - cpu) / (wall - waited) >= 0.8, (cpu_now - cpu, wall, waited)
