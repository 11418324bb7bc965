"""Fault matrix, the cache's side: its actor killed, dropped, over budget, Ray shut down.

Each test injects one fault with real processes and signals, then reads every index of
an epoch through ``CachedDataset`` and compares it with the provider
(``fault_helpers.assert_epoch_matches``): a fault may cost speed, never a wrong item, a
hang, or an error the user cannot act on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
from conftest import TESTS, run_python
from fault_helpers import actor_pid, assert_epoch_matches
from providers import ArrayProvider

import raycache
from raycache import CachedDataset, CacheUnavailableError

N = 512


def cfg(name: str, **keys) -> dict:
    return {"data_set": {}, "raycache": {"name": name, "chunk_size": 32, **keys}}


def _read(ds, indices) -> None:
    for start in range(0, len(indices), 32):
        ds.__getitems__(indices[start : start + 32])


def _lost_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cache unavailable" in r.getMessage()]


def test_directory_actor_sigkilled_during_a_warm_epoch(ray_address, cache_name, caplog):
    caplog.set_level(logging.WARNING, logger="raycache")
    provider = ArrayProvider(N)
    ds = CachedDataset(provider, cfg(cache_name))
    # Three quarters cached, so the warm epoch has misses that must ask the actor.
    _read(ds, list(range(0, 3 * N // 4)))
    assert ds.cache.flush(timeout=30)
    assert ds.cache.stats()["items"] == 3 * N // 4
    _read(ds, list(range(0, N // 4)))  # the warm epoch begins from the cache

    os.kill(actor_pid(cache_name), signal.SIGKILL)
    # New objects in the store may take the pages the dead actor's chunks held: this
    # process's views of those chunks must still read their own bytes.
    filler = [ray.put(np.full(64 * 1024, 7, dtype=np.uint8)) for _ in range(64)]
    start = time.monotonic()
    assert assert_epoch_matches(ds, provider) == N
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"an epoch after the actor died took {elapsed:.1f}s"
    start = time.monotonic()
    # Which call learns it first is timing: a call to the actor (ActorDiedError) or a
    # read of a chunk the actor owned (OwnerDiedError); either names the actor's death.
    with pytest.raises(
        CacheUnavailableError, match="gone or unreachable.*(ActorDiedError|OwnerDiedError)"
    ):
        ds.cache.stats()
    assert time.monotonic() - start < 5
    assert_epoch_matches(ds, provider)  # the next epoch too, from the provider
    with pytest.raises(CacheUnavailableError, match="gone or unreachable"):
        ds.cache.stats()
    assert len(_lost_warnings(caplog)) == 1, _lost_warnings(caplog)  # learnt once
    ds.cache.close()
    del filler

    # The next process (here: a new dataset) to use the name gets a new, working cache.
    again = CachedDataset(provider, cfg(cache_name))
    assert again.cache.stats()["items"] == 0
    assert_epoch_matches(again, provider)
    assert again.cache.flush(timeout=30)
    assert again.cache.stats()["items"] == N
    assert_epoch_matches(again, provider)
    again.cache.close()
    raycache.drop_cache(cache_name)


def test_raycache_drop_during_training(ray_address, cache_name, caplog):
    caplog.set_level(logging.WARNING, logger="raycache")
    provider = ArrayProvider(N)
    ds = CachedDataset(provider, cfg(cache_name))
    _read(ds, list(range(N // 2)))
    assert ds.cache.flush(timeout=30)
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=str(TESTS.parent))
    drop = subprocess.Popen(
        [sys.executable, "-m", "raycache.cli", "drop", cache_name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    epochs = 0
    deadline = time.monotonic() + 60
    try:
        while drop.poll() is None or epochs == 0:  # train while the drop goes on
            assert_epoch_matches(ds, provider)
            epochs += 1
            assert time.monotonic() < deadline, "raycache drop did not end"
        out, err = drop.communicate(timeout=60)
    finally:
        if drop.poll() is None:
            drop.kill()
    assert drop.returncode == 0, err
    assert_epoch_matches(ds, provider)  # after the drop: right, from the provider
    with pytest.raises(CacheUnavailableError, match="gone or unreachable"):
        ds.cache.stats()
    assert len(_lost_warnings(caplog)) <= 1
    ds.cache.close()
    assert cache_name not in raycache.list_caches()


def test_data_over_max_bytes_fills_to_budget_and_warns_once(ray_address, cache_name, caplog):
    caplog.set_level(logging.WARNING, logger="raycache")
    provider = ArrayProvider(N)
    budget = 64 * 1024
    ds = CachedDataset(provider, cfg(cache_name, max_bytes=budget))
    assert_epoch_matches(ds, provider)
    assert ds.cache.flush(timeout=30)
    assert_epoch_matches(ds, provider)  # cached part from the cache, the rest from the provider
    assert ds.cache.flush(timeout=30)
    stats = ds.cache.stats()
    assert 0 < stats["items"] < N and stats["bytes"] <= budget
    assert stats["rejected_items"] > 0
    full = [r.getMessage() for r in caplog.records if "byte budget" in r.getMessage()]
    assert len(full) == 1, full
    assert f"{budget:,} bytes" in full[0] and "not cached" in full[0]
    ds.cache.close()
    raycache.drop_cache(cache_name)


SHUTDOWN_SCRIPT = """
import logging, os, time
import ray
from fault_helpers import assert_epoch_matches
from providers import ArrayProvider
from raycache import CachedDataset, CacheUnavailableError

ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
provider = ArrayProvider(256)
ds = CachedDataset(provider, {"raycache": {"name": NAME, "chunk_size": 32}})
assert_epoch_matches(ds, provider)
assert ds.cache.flush(timeout=30)
assert_epoch_matches(ds, provider)
ray.shutdown()
start = time.monotonic()
assert_epoch_matches(ds, provider)
assert_epoch_matches(ds, provider)
try:
    ds.cache.stats()
except CacheUnavailableError as exc:
    print("STATS", type(exc).__name__, exc)
print("EPOCHS AFTER SHUTDOWN IN", round(time.monotonic() - start, 2))
ds.cache.close()
print("RAY STARTED AGAIN", ray.is_initialized())
"""


def test_ray_shutdown_under_a_client(ray_address, cache_name):
    out = run_python(SHUTDOWN_SCRIPT.replace("NAME", repr(cache_name)), ray_address, timeout=120)
    assert "STATS CacheUnavailableError" in out, out
    seconds = float(out.split("EPOCHS AFTER SHUTDOWN IN")[1].split()[0])
    assert seconds < 10, out
    assert "RAY STARTED AGAIN False" in out, out
    raycache.drop_cache(cache_name)
