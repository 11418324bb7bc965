"""Scale of the map: a cache of a million items, a new client's start-up, the actor's memory.

A cache of ``--scale-items`` items of 128 B is preloaded; a new process then attaches
(``ray.init(address=...)``, ``DataCache(...)``, first ``try_fetch``), timed, and the
directory actor's memory is read inside the actor (RSS, PSS, the map and event-log arrays).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import ray

from benchmarks.common import cache_config, close_cache, log, unique_name
from benchmarks.providers import Provider
from benchmarks.results import Row
from raycache.dataset import CachedDataset

__all__ = ["scale"]


_READY_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import ray
ray.init(address=sys.argv[1], logging_level="WARNING")
t1 = time.perf_counter()
from raycache import DataCache
import benchmarks.baselines, benchmarks.common  # torch and raycache.dataset, as a trainer
from benchmarks.providers import Provider
t2 = time.perf_counter()
n, idx = int(sys.argv[3]), int(sys.argv[3]) // 2
cache = DataCache({"raycache": {"name": sys.argv[2]}}, Provider(n, (int(sys.argv[4]),)))
item = cache.try_fetch(idx)  # attach, map snapshot, map one chunk, read
t3 = time.perf_counter()
hit = item is not None and int(item["label"]) == idx
cache.close()
print(json.dumps({"ray_init_s": t1 - t0, "import_s": t2 - t1, "ready_s": t3 - t2, "hit": hit}))
"""


def _actor_memory(actor: Any) -> dict:
    """Ask the directory actor for its map's bytes and its process's RSS and PSS."""

    def probe(self: Any) -> dict:
        from raycache.tools.memory import pss

        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return {
            **self.footprint(),
            "rss": rss,
            "pss": (pss(os.getpid()) or {}).get("pss"),
        }

    return ray.get(actor.__ray_call__.remote(probe))


def scale(args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Measure a cache of ``args.scale_items`` items: new-client readiness, actor memory.

    Parameters
    ----------
    args : argparse.Namespace
        Options (``scale_items``, ``chunk_size``, ``threads``).

    Returns
    -------
    tuple
        Rows (seconds until a new process's client is ready; actor memory in MB) and a
        dict of every number measured.
    """
    from raycache.client import directory_actor

    n = args.scale_items
    scenario = f"scale: a cache of {n:,} items of 128 B"
    log("== %s", scenario)
    provider = Provider(n, (32,))
    name = unique_name("scale")
    start = time.perf_counter()
    ds = CachedDataset(provider, cache_config(name, args, preload=True))
    actor = directory_actor(name, ds.cache.config.namespace)
    before = _actor_memory(actor)
    ds.cache.wait_for_preload()
    fill_s = time.perf_counter() - start
    after = _actor_memory(actor)
    log("   filled in %.1f s: %s", fill_s, json.dumps(after))
    probes = [_ready_probe(name, n) for _ in range(args.first_rounds)]
    close_cache(ds)
    ready = statistics.median(p["ready_s"] for p in probes)
    info = {"fill_s": fill_s, "before": before, "after": after, "probes": probes}
    growth_mb = (after["rss"] - before["rss"]) / 1e6
    rows = [
        Row(
            scenario,
            "new client: attach, map snapshot, first read",
            ready,
            "s",
            note="after ray.init(address=...) "
            f"{statistics.median(p['ray_init_s'] for p in probes):.2f} s and importing raycache "
            f"{statistics.median(p['import_s'] for p in probes):.2f} s; target < 2 s",
            samples=[p["ready_s"] for p in probes],
        ),
        Row(
            scenario,
            "directory actor RSS growth for the map (MB)",
            growth_mb,
            "MB",
            note=f"RSS {before['rss'] / 1e6:.0f} -> {after['rss'] / 1e6:.0f} MB, PSS "
            f"{(after['pss'] or 0) / 1e6:.0f} MB, map arrays {after['map_bytes'] / 1e6:.1f} MB, "
            f"event log {after['event_log_bytes'] / 1e6:.1f} MB; target < 300 MB",
        ),
    ]
    return rows, info


def _ready_probe(name: str, n: int) -> dict:
    """Time a new process attaching to cache ``name`` and reading one item."""
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-c", _READY_PROBE, address, name, str(n), "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"new-client probe failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["hit"]:
        raise RuntimeError(f"the new client did not read the cached item: {result}")
    log("   new client: %s", json.dumps(result))
    return result
