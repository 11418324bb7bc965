"""Where a preload's time goes: per-unit times from the task side, summed by the actor.

``UnitTimes`` and ``RunProfile`` are tested alone; ``read_units`` is run in this process
with a claim of the test's own (no Ray: it is the task's body) to check that every
summary carries its unit's times; then a real preload shows the sums in
``stats()["preload"]["profile"]``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from providers import ArrayProvider

from raycache import CachedDataset
from raycache.preload.profile import PARTS, RunProfile, UnitTimes
from raycache.preload.task import read_units

pytestmark = pytest.mark.timeout(180)


def test_unit_times_add_up_and_start_again_after_take():
    times = UnitTimes(began=123.0)
    start = time.monotonic() - 0.5  # half a second ago
    now = times.add("wait_s", start)
    assert now >= start + 0.5
    assert times.wait_s >= 0.5
    times.add("put_s", now)
    first = times.take()
    assert set(first) == set(PARTS) | {"began"}
    assert first["began"] == 123.0 and first["wait_s"] >= 0.5
    second = times.take()  # zero again, and ``began`` only once
    assert "began" not in second
    assert all(second[part] == 0.0 for part in PARTS)


def test_run_profile_sums_units_and_per_item_figures():
    profile = RunProfile(started=1000.0)
    empty = profile.report()
    assert empty["units"] == 0 and empty["per_item_us"] is None and empty["first_task_s"] is None
    unit = {"claim_s": 0.01, "wait_s": 0.5, "build_s": 0.02, "put_s": 0.07, "began": 1000.25}
    profile.unit(unit, 100, register_s=0.003)
    later = dict(unit, began=1000.75)
    profile.unit(later, 100, register_s=0.001)
    profile.unit(None, 50, register_s=0.002)  # a task that sent no times still counts
    report = profile.report()
    assert (report["units"], report["items"]) == (3, 250)
    assert report["first_task_s"] == pytest.approx(0.25)
    assert report["last_task_s"] == pytest.approx(0.75)
    assert report["first_chunk_s"] is not None
    assert report["register_s"] == pytest.approx(0.006)
    assert report["wait_s"] == pytest.approx(1.0)
    # The tasks' own parts (claim, build, put), not the wait for the provider's reads.
    assert report["per_item_us"] == pytest.approx(1e6 * 0.2 / 250)
    assert report["per_unit_ms"] == pytest.approx(1e3 * 0.2 / 3)


def test_every_summary_read_units_yields_carries_its_unit_times():
    provider = ArrayProvider(96, latency_s=0.002)
    starts = iter(range(0, 96, 32))

    def claim(done):
        start = next(starts, None)
        return None if start is None else (start, np.arange(start, start + 32))

    summaries = [v for v in read_units(provider, claim, 4, began=42.0) if isinstance(v, dict)]
    assert [len(s["indices"]) for s in summaries] == [32, 32, 32]
    for k, summary in enumerate(summaries):
        times = summary["times"]
        assert all(times[part] >= 0.0 for part in PARTS)
        assert ("began" in times) == (k == 0)  # the task's start, with the first unit only
        # 32 reads of 2 ms on 4 threads: the slot waited for reads in every unit.
        assert times["wait_s"] > 0.0
    assert summaries[0]["times"]["began"] == 42.0


def test_stats_show_where_the_preload_time_went(ray_address, cache_name):
    n = 256
    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 4},
        "raycache": {"name": cache_name, "chunk_size": 64},
    }
    ds = CachedDataset(ArrayProvider(n, latency_s=0.002), config)
    try:
        assert ds.cache.wait_for_preload(timeout=120), "the preload did not end"
        status = ds.cache.stats()["preload"]
        profile = status["profile"]
        assert profile["items"] == status["items"] == n
        assert 1 <= profile["units"] <= status["units"]
        assert profile["first_task_s"] is not None and profile["first_task_s"] >= 0.0
        assert profile["last_task_s"] >= profile["first_task_s"]
        assert profile["first_chunk_s"] <= status["seconds"]
        assert profile["wait_s"] > 0.0  # 2 ms per read: the slots waited for reads
        assert all(profile[part] >= 0.0 for part in PARTS)
        assert profile["per_item_us"] > 0.0 and profile["per_unit_ms"] > 0.0
    finally:
        ds.cache.close()
