"""Functions run in spawned processes by the cross-process tests."""

from __future__ import annotations

import ray
from providers import ArrayProvider, make_item

from raycache import DataCache


def insert_range(address: str, name: str, n: int, indices: list, barrier, out) -> None:
    ray.init(address=address, logging_level="WARNING")
    cache = DataCache({"raycache": {"name": name, "chunk_size": 32}}, ArrayProvider(n))
    cache.try_fetch(0)  # attach before the race starts
    barrier.wait(timeout=120)
    for i in indices:
        cache.insert_into_cache(i, make_item(i))
    out.put(cache.flush(timeout=60))
    cache.close()
    ray.shutdown()
