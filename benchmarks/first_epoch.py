"""First epochs: a new cache filled while the trainer reads it, and the start-up it costs.

preload
    The first epoch while the cache preloads, with a provider that sleeps 2 ms per item
    (I/O latency) and one that does ~1 ms of pure-Python work per item (holds the GIL),
    against a thread-pool preloader of the same concurrency (Hyrax's) and no cache.
fill
    The first epoch without preload (each miss read by the trainer and inserted) against
    the same epoch with no cache: the cost of caching.
startup
    The one-off cost the first-epoch rows leave out: a new cache's directory actor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import ray

import raycache
from benchmarks.baselines import ThreadPoolCache
from benchmarks.common import (
    cache_config,
    close_cache,
    log,
    make_loader,
    timed_epoch,
    unique_name,
)
from benchmarks.providers import Provider
from benchmarks.results import Row, compare
from raycache.dataset import CachedDataset

__all__ = ["fill", "preload", "startup", "warm_workers"]


@ray.remote
def _warm_worker() -> int:
    # Importing what a preload task needs (raycache, torch, the providers) is a one-off
    # cost of each new worker process; see ``startup``. These two modules import the
    # providers, torch and raycache's dataset.
    import benchmarks.baselines  # noqa: F401
    import benchmarks.common  # noqa: F401
    import raycache.preload  # noqa: F401

    return os.getpid()


def warm_workers(count: int) -> float:
    """Start ``count`` Ray workers with raycache imported; return the seconds it took.

    Parameters
    ----------
    count : int
        Workers (one per CPU).

    Returns
    -------
    float
        Seconds.
    """
    start = time.perf_counter()
    ray.get([_warm_worker.remote() for _ in range(count)])
    return time.perf_counter() - start


def _attached(provider: Provider, args: argparse.Namespace, name: str) -> tuple:
    """Create cache ``name``'s directory actor; return (handle, seconds it took)."""
    start = time.perf_counter()
    cache = raycache.DataCache(cache_config(name, args, preload=False), provider)
    cache.stats()  # attaches: the actor is created and the client gets the map
    return cache, time.perf_counter() - start


def _first_epoch_raycache(provider: Provider, args: argparse.Namespace, preload: bool) -> tuple:
    """Run epoch 1 of a new cache; return (epoch seconds, cache-full seconds).

    The cache's actor is created first and the workers are warmed, untimed: those are
    one-off start-up costs (``startup`` measures them) that a Ray process pool of
    threads does not have and that a benchmark of a few seconds would otherwise be all
    about. The time runs from building the ``CachedDataset`` (which starts the preload)
    to the end of the epoch, the final flush of inserted items included.
    """
    name = unique_name("first")
    holder, _ = _attached(provider, args, name)
    warm_workers(args.num_cpus)
    start = time.perf_counter()
    ds = CachedDataset(provider, cache_config(name, args, preload=preload))
    timed_epoch(make_loader(ds, ds.collate))
    ds.cache.flush()
    seconds = time.perf_counter() - start
    full = None
    if preload:
        ds.cache.wait_for_preload()
        full = ds.cache.stats()["preload"]["seconds"]
    holder.close()
    close_cache(ds)
    return seconds, full


def startup(args: argparse.Namespace) -> list[Row]:
    """Measure the one-off cost the first-epoch rows leave out: a new cache's actor.

    A new cache starts its directory actor in a new process, which imports raycache (and
    with it torch) before it can answer. Preload workers that have not imported raycache
    yet pay the same import on their first task (``warm_workers`` pays it, untimed,
    before each timed first epoch).

    Parameters
    ----------
    args : argparse.Namespace
        Options.

    Returns
    -------
    list of Row
        Seconds to create a new cache's actor and attach to it.
    """
    scenario = "start-up, once per cache (left out of the first-epoch rows)"
    log("== %s", scenario)
    provider = Provider(1, (1,))
    holder, attach = _attached(provider, args, unique_name("startup"))
    holder.close()
    raycache.drop_cache(holder.name)
    log("   actor %.2f s", attach)
    rows = [Row(scenario, "new cache: directory actor created, client attached", attach, "s")]
    return rows


def _first_epoch_threads(provider: Provider, threads: int) -> tuple:
    start = time.perf_counter()
    cache = ThreadPoolCache(provider, threads)
    cache.start()
    timed_epoch(make_loader(cache))
    seconds = time.perf_counter() - start
    cache.stop()
    return seconds, cache.done_at


def _first_epoch_nocache(provider: Provider) -> tuple:
    start = time.perf_counter()
    timed_epoch(make_loader(provider))
    return time.perf_counter() - start, None


def preload(args: argparse.Namespace, kind: str, provider: Provider) -> list[Row]:
    """First epoch while preloading, against a thread pool and against no cache.

    Parameters
    ----------
    args : argparse.Namespace
        Options.
    kind : str
        ``"io"`` (sleep per item) or ``"cpu"`` (pure-Python work per item).
    provider : Provider
        The slow provider.

    Returns
    -------
    list of Row
        One row per variant (seconds for the whole first epoch).
    """
    what = "2 ms I/O latency" if kind == "io" else "~1 ms pure-Python CPU"
    scenario = f"first epoch with preload, {what} per item, n={len(provider):,}"
    log("== %s", scenario)
    runs = {
        "raycache preload (Ray tasks)": lambda: _first_epoch_raycache(provider, args, True),
        f"thread pool preload, {args.threads} threads": lambda: _first_epoch_threads(
            provider, args.threads
        ),
        "no cache": lambda: _first_epoch_nocache(provider),
    }
    # No cache is a reference without a target, and each of its epochs takes the
    # provider's whole latency: fewer rounds of it leave time for more of the two rows
    # the target compares.
    limits = {"no cache": min(args.nocache_rounds, args.preload_rounds)}
    samples, full = _first_epoch_samples(runs, args.preload_rounds, limits)
    mine, pool = list(runs)[:2]
    target = 1.0 if kind == "io" else 1.6
    checks = {mine: {pool: target, "no cache": None}, pool: {"no cache": None}}
    notes = {k: f"cache full after {statistics.median(v):.2f} s" for k, v in full.items() if v}
    return compare(scenario, samples, "s", checks, notes)


def _first_epoch_samples(
    runs: dict[str, Callable[[], tuple]], rounds: int, limits: dict[str, int] | None = None
) -> tuple:
    """Run each variant once per round, in an order that rotates; ``limits``: fewer rounds."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    full: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    limits = limits or {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if r >= limits.get(name, rounds):
                continue
            seconds, done = runs[name]()
            samples[name].append(seconds)
            if done is not None:
                full[name].append(done)
            log("   %-34s %8.2f s", name, seconds)
    return samples, full


def fill(args: argparse.Namespace, kind: str, provider: Provider) -> list[Row]:
    """First epoch filling the cache on misses against the same epoch with no cache.

    Parameters
    ----------
    args : argparse.Namespace
        Options.
    kind : str
        ``"io"``, ``"cpu"`` or ``"memory"`` (no cost per item: the worst case).
    provider : Provider
        The provider.

    Returns
    -------
    list of Row
        Two rows (seconds for the first epoch, including the final flush).
    """
    what = {"io": "2 ms I/O latency", "cpu": "~1 ms pure-Python CPU", "memory": "no delay"}[kind]
    scenario = f"first epoch filling on miss, {what} per item, n={len(provider):,}"
    log("== %s", scenario)
    runs = {
        "raycache fill on miss": lambda: _first_epoch_raycache(provider, args, False),
        "no cache": lambda: _first_epoch_nocache(provider),
    }
    samples, _ = _first_epoch_samples(runs, args.first_rounds)
    # Targets as time ratios: <= 1.1x the epoch without a cache for a provider with a
    # cost of its own, <= 2x for one that costs nothing (then the cache's own copies are
    # all there is to measure); as speed ratios, >= 1/1.1 and >= 0.5.
    target = 1 / 1.1 if kind != "memory" else 0.5
    checks = {"raycache fill on miss": {"no cache": target}}
    notes = {"raycache fill on miss": "includes the final flush"}
    return compare(scenario, samples, "s", checks, notes)
