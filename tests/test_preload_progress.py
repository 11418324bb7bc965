"""A preload's progress: items, bytes, items/s, ETA and errors in ``stats()["preload"]``.

``Progress`` (raycache.preload.progress) is tested alone with a clock of the test's own;
then a real preload is watched through ``DataCache.stats()["preload"]`` while it runs
and after it ends.
"""

from __future__ import annotations

import time

import pytest
from providers import ArrayProvider

from raycache import CachedDataset
from raycache.preload.progress import Progress
from raycache.preload.units import UnitScheduler

pytestmark = pytest.mark.timeout(180)

NEW_KEYS = ("items", "bytes", "items_per_s", "eta_s", "error_count")
TODAYS_KEYS = ("state", "loaded", "errors", "tasks", "threads_per_task", "units", "reserved")


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_progress_before_any_item_has_no_eta():
    clock = FakeClock()
    progress = Progress(clock)
    clock.now += 2.0
    status = progress.status(items_left=100)
    assert status["state"] == "running"
    assert status["items"] == status["loaded"] == status["bytes"] == 0
    assert status["items_per_s"] == 0.0
    assert status["eta_s"] is None
    assert status["seconds"] == pytest.approx(2.0)


def test_progress_rate_and_eta_follow_what_was_stored():
    clock = FakeClock()
    progress = Progress(clock)
    clock.now += 2.0
    progress.stored(300, 3000)
    progress.stored(100, 1000)
    status = progress.status(items_left=600)
    assert (status["items"], status["loaded"], status["bytes"]) == (400, 400, 4000)
    assert status["items_per_s"] == pytest.approx(200.0)
    assert status["eta_s"] == pytest.approx(3.0)  # 600 items at 200 items/s
    progress.errors.append({"index": 7, "error": "ValueError: no"})
    status = progress.status(items_left=600)
    assert status["error_count"] == 1
    assert status["errors"] == [{"index": 7, "error": "ValueError: no"}]
    status["errors"].clear()  # a copy: the caller cannot change the run's record
    assert progress.status(0)["error_count"] == 1


def test_progress_at_the_end_is_frozen_with_eta_zero():
    clock = FakeClock()
    progress = Progress(clock)
    clock.now += 4.0
    progress.stored(800, 8000)
    progress.state = "done"
    progress.end()
    clock.now += 100.0  # later reads see the run's own time, not the time since
    status = progress.status(items_left=123)
    assert status["eta_s"] == 0.0
    assert status["seconds"] == pytest.approx(4.0)
    assert status["items_per_s"] == pytest.approx(200.0)
    assert status["state"] == "done"


def test_items_left_counts_the_range_the_units_and_the_wanted():
    units = UnitScheduler(1000, 1, 1, 100, 1 << 20, lambda idx: idx)
    assert units.items_left() == 1000
    key, todo = units.claim(None)
    assert units.items_left() == 1000  # 900 ahead and 100 being read
    units.registered(key)
    assert units.items_left() == 900


def _config(name: str) -> dict:
    return {
        "data_set": {"preload_cache": True, "preload_threads": 2},
        "raycache": {"name": name, "chunk_size": 16},
    }


def test_stats_report_the_preload_progress_while_it_runs_and_at_the_end(ray_address, cache_name):
    """Through DataCache.stats(): progress while running, final figures once done."""
    n, bad = 400, 5
    ds = CachedDataset(ArrayProvider(n, latency_s=0.01, fail_at=(bad,)), _config(cache_name))
    try:
        deadline = time.monotonic() + 60
        running = None
        while time.monotonic() < deadline:
            status = ds.cache.stats()["preload"]
            if status["state"] != "running":
                break
            if 0 < status["items"] < n - 1 - 32:  # far enough from the end to see an ETA
                running = status
                break
            time.sleep(0.02)
        assert running is not None, f"no progress seen while running: {status}"
        for key in NEW_KEYS + TODAYS_KEYS:
            assert key in running, key
        assert running["loaded"] == running["items"]
        assert running["bytes"] > 0
        assert running["items_per_s"] > 0
        assert running["eta_s"] is not None and running["eta_s"] > 0
        # About what is left at the pace so far (an overestimate, never an underestimate
        # here: no trainer stores anything).
        assert running["eta_s"] >= (n - 1 - running["items"]) / running["items_per_s"] * 0.99

        assert ds.cache.wait_for_preload(timeout=60), "the preload did not end"
        stats = ds.cache.stats()
        final = stats["preload"]
        assert final["state"] == "done_with_errors"
        assert final["items"] == final["loaded"] == n - 1 == stats["items"]
        assert final["bytes"] == stats["bytes"]
        assert final["eta_s"] == 0.0
        assert final["items_per_s"] == pytest.approx(final["items"] / final["seconds"])
        assert final["error_count"] == 1
        assert [e["index"] for e in final["errors"]] == [bad]
        assert stats["preload_errors"] == final["errors"]
        assert final["reserved"] == 0
    finally:
        ds.cache.close()
