"""Fault matrix, the preload's side: a provider that raises at some indices or at all.

A preload records what it could not read and goes on; the index's error reaches the
trainer that reads it, naming the index; the end of the run is one summary line, and
``wait_for_preload()`` does not report success for a preload that stored nothing.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import types

import fault_helpers
import pytest
import ray.cloudpickle
from fault_helpers import (
    HangsAt,
    UnsupportedItems,
    actor_pid,
    assert_epoch_matches,
    store_objects,
)
from providers import ArrayProvider

import raycache
from raycache import CachedDataset
from raycache.errors import PreloadFailedError

# Preload tasks run in Ray workers, which cannot import the tests' modules.
ray.cloudpickle.register_pickle_by_value(fault_helpers)


def cfg(name: str, **keys) -> dict:
    return {
        "data_set": {"preload_cache": True, "preload_threads": 2},
        "raycache": {"name": name, "chunk_size": 32, **keys},
    }


def test_provider_raising_at_some_indices(ray_address, cache_name, caplog):
    caplog.set_level(logging.INFO, logger="raycache")
    bad = (13, 77, 200)
    provider = ArrayProvider(256, fail_at=bad)
    ds = CachedDataset(provider, cfg(cache_name))
    assert ds.cache.wait_for_preload(timeout=120) is True  # it went on past them
    stats = ds.cache.stats()
    assert stats["preload"]["state"] == "done_with_errors"
    assert stats["preload"]["error_count"] == 3
    assert sorted(e["index"] for e in stats["preload_errors"]) == list(bad)
    assert all("reading index" not in e["error"] for e in stats["preload_errors"])
    assert stats["items"] == 256 - 3
    ended = [r.getMessage() for r in caplog.records if "ended with errors" in r.getMessage()]
    assert len(ended) == 1 and "3 of 256" in ended[0], ended
    assert ds.cache.wait_for_preload(timeout=30) is True
    assert len([r for r in caplog.records if "ended with errors" in r.getMessage()]) == 1

    assert assert_epoch_matches(ds, provider, skip=bad) == 256 - 3
    for idx in bad:
        with pytest.raises(ValueError, match=f"cannot read item {idx}") as info:
            ds[idx]
        assert f"reading index {idx}" in " ".join(info.value.__notes__)
        with pytest.raises(ValueError, match=f"cannot read item {idx}"):
            ds.__getitems__([0, idx, 1])
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_a_preload_that_stores_nothing_is_not_reported_as_success(ray_address, cache_name, capfd):
    n = 200
    ds = CachedDataset(UnsupportedItems(n), cfg(cache_name))
    with pytest.raises(PreloadFailedError, match=f"{n} of {n} items could not be read, 0 stored"):
        ds.cache.wait_for_preload(timeout=120)
    with pytest.raises(PreloadFailedError):  # every time it is asked, not once
        ds.cache.wait_for_preload(timeout=30)
    stats = ds.cache.stats()
    assert stats["items"] == 0 and stats["preload"]["error_count"] == n
    assert "UnsupportedValueError" in stats["preload_errors"][0]["error"]
    # The actor's log reaches this driver: a few examples and one summary, not n lines.
    err = ""
    deadline = time.monotonic() + 20
    while "preload ended" not in err and time.monotonic() < deadline:
        time.sleep(0.2)
        err += capfd.readouterr().err
    assert f"preload ended: {n} of {n} items could not be read" in err, err[-2000:]
    # (Other tests' preload lines may arrive here too: count this provider's only.)
    examples = [
        line
        for line in err.splitlines()
        if "could not read index" in line and "UnsupportedValueError" in line
    ]
    assert 1 <= len(examples) <= 3, err[-3000:]
    ds.cache.close()
    raycache.drop_cache(cache_name)


# A provider class whose module the driver imports and Ray's workers cannot: a package
# installed only where the script runs, or a directory added to ``sys.path`` by hand.
HIDDEN_MODULE = "raycache_tests_driver_only"
HIDDEN_SOURCE = """
import numpy as np

class DriverOnlyProvider:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return {"image": np.full(16, idx, np.float32), "label": idx}
"""


def test_a_provider_ray_workers_cannot_import_fails_the_preload_and_says_why(
    ray_address, cache_name
):
    module = types.ModuleType(HIDDEN_MODULE)
    exec(HIDDEN_SOURCE, module.__dict__)
    sys.modules[HIDDEN_MODULE] = module  # pickled by reference, as an installed module is
    try:
        provider = module.DriverOnlyProvider(96)
        ds = CachedDataset(provider, cfg(cache_name))
        expected = f"ModuleNotFoundError: No module named '{HIDDEN_MODULE}'.*import the provider"
        with pytest.raises(PreloadFailedError, match=f"every preload task failed.*{expected}"):
            ds.cache.wait_for_preload(timeout=120)
        stats = ds.cache.stats()
        assert stats["preload"]["state"] == "failed" and stats["items"] == 0
        assert [e["index"] for e in stats["preload_errors"]] == [None]
        assert "96 items never read" in stats["preload_errors"][0]["error"]
        # Training still works: this process reads the provider and fills the cache.
        assert assert_epoch_matches(ds, provider) == 96
        assert ds.cache.flush(timeout=30)
        assert ds.cache.stats()["items"] == 96
        ds.cache.close()
        raycache.drop_cache(cache_name)
    finally:
        del sys.modules[HIDDEN_MODULE]


def test_a_provider_hanging_at_one_index_times_out_and_the_rest_is_preloaded(
    ray_address, cache_name
):
    # The read of index 40 would take 25 s; the limit is 1 s.
    provider = HangsAt(128, hang_at=40, hang_s=25.0)
    ds = CachedDataset(provider, cfg(cache_name, preload_item_timeout_s=1.0))
    start = time.monotonic()
    assert ds.cache.wait_for_preload(timeout=60) is True
    assert time.monotonic() - start < 20, "the preload waited for the hung read"
    stats = ds.cache.stats()
    assert stats["items"] == 127 and stats["preload"]["error_count"] == 1
    error = stats["preload_errors"][0]
    assert error["index"] == 40
    assert "TimeoutError" in error["error"] and "preload_item_timeout_s" in error["error"]
    assert assert_epoch_matches(ds, provider, skip=(40,)) == 127
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_preload_on_error_stop_hands_out_no_more_units(ray_address, cache_name):
    provider = ArrayProvider(1024, fail_at=(3,))
    ds = CachedDataset(provider, cfg(cache_name, chunk_size=32, preload_on_error="stop"))
    assert ds.cache.wait_for_preload(timeout=120) is True  # the failing unit's others stored
    stats = ds.cache.stats()
    assert stats["preload"]["error_count"] == 1 and stats["preload_errors"][0]["index"] == 3
    assert 0 < stats["items"] <= 256, stats["items"]  # stopped early, not 1,023
    assert assert_epoch_matches(ds, provider, skip=(3,)) == 1023  # the rest from the provider
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_the_actor_killed_during_a_preload_leaves_nothing_in_the_object_store(
    ray_address, cache_name
):
    before = store_objects()
    # A read that takes 4 s keeps a preload task running when the actor is killed.
    provider = HangsAt(256, hang_at=40, hang_s=4.0)
    ds = CachedDataset(provider, cfg(cache_name))
    deadline = time.monotonic() + 60
    while ds.cache.stats()["preload"]["units"] < 2:  # both slots are reading
        assert time.monotonic() < deadline, "the preload handed out no units"
        time.sleep(0.05)
    os.kill(actor_pid(cache_name), signal.SIGKILL)
    assert assert_epoch_matches(ds, provider) == 256  # from the provider
    ds.cache.close()
    del ds
    gc.collect()  # a closed client's mapped chunks go with its cycle
    # The tasks end once they find the actor gone; what the actor owned goes with it.
    deadline = time.monotonic() + 30
    while (left := store_objects()) > before and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left <= before, f"{left - before} objects left in the object store"
