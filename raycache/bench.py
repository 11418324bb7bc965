"""The benchmark suite: every raycache scenario against its baselines, in one run.

A speed claim only means something next to the alternative measured on the same machine
at the same time, so ``raycache bench`` starts one local Ray, runs every scenario and its
baselines in this process tree, and reports each result as a ratio to its baseline.
The machine is often shared and noisy: warm epochs are repeated in rounds whose order
rotates, and the median is reported. It writes ``docs/benchmarks.md`` (workload,
caveats, then the table) and ``docs/benchmarks.png``.

Scenarios
---------
warm
    A shuffled epoch, batch 64, ``num_workers=0``, of a fully cached dataset, for 48 KiB
    and 1 KiB items, against the numpy fancy-index gather limit, a plain in-process dict
    cache (what Hyrax keeps) and Ray Data (``materialize`` + ``iter_torch_batches`` with a
    local shuffle buffer).
preload
    The first epoch while the cache preloads, with a provider that sleeps 2 ms per item
    (I/O latency) and one that does ~1 ms of pure-Python work per item (holds the GIL),
    against a thread-pool preloader of the same concurrency (Hyrax's) and no cache.
fill
    The first epoch without preload (each miss read by the trainer and inserted) against
    the same epoch with no cache: the cost of caching.
scale
    A cache of a million items: how long a new process takes to be ready to read, and the
    directory actor's memory for the map.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, Dataset

import raycache
from raycache.dataset import CachedDataset

__all__ = ["Provider", "Row", "main", "run_scenarios", "spin"]

logger = logging.getLogger(__name__)

BATCH = 64
KIB = 1024
MIB = 1024 * 1024


# --------------------------------------------------------------------------- providers
def spin(iterations: int) -> int:
    """Do a fixed amount of pure-Python work, holding the GIL throughout.

    A fixed amount of work, not a fixed time: a loop that spins until a deadline would
    let GIL-bound threads appear to overlap (each deadline passes while another thread
    computes), hiding exactly the contention this benchmark is about.

    Parameters
    ----------
    iterations : int
        Loop iterations.

    Returns
    -------
    int
        A value depending on every iteration, so nothing can be skipped.
    """
    acc = 0
    for k in range(iterations):
        acc = (acc ^ k) & 0xFFFF  # the same cost for every k: calibration stays linear
    return acc


def calibrate_spin(seconds: float, trials: int = 7) -> int:
    """Return the ``spin`` iterations that take ``seconds`` on an idle core here.

    The fastest of several trials is used, so time taken by other processes on a
    shared machine does not inflate the work per item.

    Parameters
    ----------
    seconds : float
        Target CPU time per call.
    trials : int
        Timed trials.

    Returns
    -------
    int
        Iterations.
    """
    iterations = 10_000
    for _ in range(2):  # the second pass times about the target amount of work
        best = min(_timed(lambda n=iterations: spin(n)) for _ in range(trials))
        iterations = max(1, int(iterations * seconds / best))
    return iterations


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Provider:
    """A synthetic data provider: ``{"image": float32 array, "label": int}`` per index.

    Parameters
    ----------
    n : int
        Number of items.
    shape : tuple of int
        Shape of each image.
    latency_s : float
        Seconds to sleep per item (I/O latency; releases the GIL).
    spin_iterations : int
        ``spin`` iterations per item (CPU work; holds the GIL).
    """

    def __init__(
        self, n: int, shape: Sequence[int], latency_s: float = 0.0, spin_iterations: int = 0
    ):
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        self.latency_s = float(latency_s)
        self.spin_iterations = int(spin_iterations)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict:
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.spin_iterations:
            spin(self.spin_iterations)
        return {"image": np.full(self.shape, float(idx), dtype=np.float32), "label": int(idx)}


# --------------------------------------------------------------------------- baselines
class ListDataset(Dataset):
    """Hyrax's dict cache, warm: items kept as Python objects in this process."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Any:
        return self.items[idx]


class GatherDataset(Dataset):
    """The memory-bandwidth limit: one numpy array per field, one fancy index per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> Any:
        return self.__getitems__([idx])

    def __getitems__(self, indices: Sequence[int]) -> dict:
        """Return the batch as tensors, gathered with one copy per field."""
        idx = np.asarray(indices)
        return {
            "image": torch.from_numpy(self.images[idx]),
            "label": torch.from_numpy(self.labels[idx]),
        }


class ThreadPoolCache(Dataset):
    """What Hyrax does: a dict cache filled by a background thread pool, plus misses.

    ``start()`` submits every index to a pool of ``threads`` threads, each reading the
    provider and inserting into the dict; a read that misses reads the provider itself
    and inserts, as Hyrax's ``DataCache`` does.
    """

    def __init__(self, provider: Provider, threads: int):
        self.provider = provider
        self.threads = threads
        self.items: dict[int, Any] = {}
        self.done_at: float | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start preloading every index in the background."""
        self._pool = ThreadPoolExecutor(max_workers=self.threads)
        futures = [self._pool.submit(self._load, i) for i in range(len(self.provider))]
        start = time.perf_counter()

        def finished(_: Any) -> None:
            if all(f.done() for f in futures):
                self.done_at = time.perf_counter() - start

        futures[-1].add_done_callback(finished)

    def _load(self, idx: int) -> None:
        if idx not in self.items:
            self.items[idx] = self.provider[idx]

    def stop(self) -> None:
        """Wait for the pool's threads to end."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.provider)

    def __getitem__(self, idx: int) -> Any:
        item = self.items.get(idx)
        if item is None:
            item = self.items[idx] = self.provider[idx]
        return item


def _identity(batch: Any) -> Any:
    return batch


# --------------------------------------------------------------------------- results
@dataclass
class Row:
    """One measured variant of one scenario, compared with its baselines.

    Attributes
    ----------
    scenario : str
        What was measured, for example ``"warm, 48 KiB items"``.
    variant : str
        Which implementation.
    value : float
        Items per second (``unit == "items/s"``, higher is better) or seconds
        (``unit == "s"``, lower is better).
    unit : str
        ``"items/s"`` or ``"s"``.
    ratios : dict
        Baseline variant -> ratio, always oriented so that > 1 means this variant is
        better (faster, or less time).
    targets : dict
        Baseline variant -> the ratio the issue asks for.
    note : str
        Anything a reader must know to interpret the row.
    samples : list of float
        Every measurement behind ``value`` (the median of them).
    """

    scenario: str
    variant: str
    value: float
    unit: str
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    note: str = ""
    samples: list[float] = field(default_factory=list)


def _compare(
    scenario: str,
    values: dict[str, list[float]],
    unit: str,
    checks: dict[str, dict[str, float | None]],
    notes: dict[str, str] | None = None,
) -> list[Row]:
    """Build rows from samples; ``checks[variant][baseline]`` is a target or None."""
    notes = notes or {}
    medians = {k: statistics.median(v) for k, v in values.items()}
    rows = []
    for variant, samples in values.items():
        row = Row(scenario, variant, medians[variant], unit, note=notes.get(variant, ""))
        row.samples = list(samples)
        for baseline, target in checks.get(variant, {}).items():
            row.ratios[baseline] = _paired_ratio(samples, values[baseline], unit)
            if target is not None:
                row.targets[baseline] = target
        rows.append(row)
    return rows


def _paired_ratio(mine: list[float], theirs: list[float], unit: str) -> float:
    """Return the median over rounds of the ratio within each round (> 1: ``mine`` better).

    Both lists hold one sample per round, taken back to back, so a round's ratio compares
    runs that saw the same interference from the rest of a shared machine; the median of
    those is steadier than the ratio of two medians taken at different moments. A
    baseline run in fewer rounds (``--nocache-rounds``) is compared by its median.
    """
    if len(mine) != len(theirs):
        theirs = [statistics.median(theirs)] * len(mine)
    if unit == "items/s":
        return statistics.median(m / t for m, t in zip(mine, theirs))
    return statistics.median(t / m for m, t in zip(mine, theirs))


# --------------------------------------------------------------------------- helpers
def _config(name: str, args: argparse.Namespace, preload: bool, **raycache_keys: Any) -> dict:
    return {
        "data_set": {
            "use_cache": True,
            "preload_cache": preload,
            "preload_threads": args.threads,
        },
        "raycache": {"name": name, "chunk_size": args.chunk_size, **raycache_keys},
    }


def _name(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


def _epoch(loader: Iterable) -> float:
    """Run one epoch; return items per second."""
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def _loader(dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
    kwargs = {} if collate_fn is None else {"collate_fn": collate_fn}
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0, **kwargs)


def _raydata_epoch(dataset: Any, limit: int) -> float:
    """Items per second of Ray Data's shuffled batches over at most ``limit`` items."""
    start = time.perf_counter()
    count = 0
    batches = dataset.iter_torch_batches(batch_size=BATCH, local_shuffle_buffer_size=2000)
    for batch in batches:
        count += len(batch["label"])
        if count >= limit:
            break
    return count / (time.perf_counter() - start)


def _rounds(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order; return all samples."""
    names = list(variants)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(variants[name]())
            logger.info("  %-34s %12.0f", name, samples[name][-1])
    return samples


def _close(ds: CachedDataset) -> None:
    ds.cache.close()
    raycache.drop_cache(ds.cache.name)


def _log(msg: str, *args: Any) -> None:
    print(msg % args if args else msg, flush=True)


# --------------------------------------------------------------------------- warm
def warm(args: argparse.Namespace, n: int, shape: tuple[int, ...], label: str) -> list[Row]:
    """Warm shuffled epochs of a fully cached dataset against the alternatives.

    Parameters
    ----------
    args : argparse.Namespace
        Options (rounds, threads, chunk size, Ray Data item limit).
    n : int
        Items.
    shape : tuple of int
        Image shape (float32).
    label : str
        Item size, for the scenario's name.

    Returns
    -------
    list of Row
        One row per variant.
    """
    scenario = f"warm epoch, {label} items, n={n:,}"
    _log("== %s", scenario)
    provider = Provider(n, shape)
    start = time.perf_counter()
    ds = CachedDataset(provider, _config(_name(f"warm{label}"), args, preload=True))
    ds.cache.wait_for_preload()
    _log(
        "   raycache preload: %.1f s, %d chunks",
        time.perf_counter() - start,
        ds.cache.stats()["chunks"],
    )
    variants = _warm_variants(ds, provider, args)
    big = shape_bytes(shape) >= 16 * KIB
    extra = None
    if not big and args.small_chunk_size:
        # The same cache with larger chunks: a shuffled batch then touches fewer chunks.
        config = _config(_name("warm1k"), args, preload=True, chunk_size=args.small_chunk_size)
        extra = CachedDataset(provider, config)
        extra.cache.wait_for_preload()
        tag = f"chunk_size={args.small_chunk_size:,}"
        variants[f"raycache, ds.collate, {tag}"] = lambda: _epoch(_loader(extra, extra.collate))
        variants[f"raycache, default_collate, {tag}"] = lambda: _epoch(_loader(extra))
    for fn in variants.values():  # warm-up: map chunks, fault pages in, start Ray Data
        fn()
    samples = _rounds(variants, args.rounds)
    variants.clear()  # frees the baselines' copies of the data
    for cached in (ds, extra):
        if cached is not None:
            _close(cached)
    gc.collect()
    limit = min(n, args.raydata_items)
    checks: dict[str, dict[str, float | None]] = {
        "raycache, collate_fn=ds.collate": {
            "dict cache, default_collate": 1.4 if big else 1.8,
            "numpy gather (limit)": 0.5 if big else None,
            "Ray Data iter_torch_batches": 5.0 if big else None,
        },
        "raycache, default_collate": {"dict cache, default_collate": 1.0 if big else 0.85},
        "Ray Data iter_torch_batches": {"dict cache, default_collate": None},
    }
    for variant in samples:
        if "chunk_size=" in variant:
            checks[variant] = {"dict cache, default_collate": None}
    notes = {
        "Ray Data iter_torch_batches": f"first {limit:,} items of each epoch",
        "numpy gather (limit)": "one fancy index per field from one in-process array",
    }
    return _compare(scenario, samples, "items/s", checks, notes)


def _warm_variants(
    ds: CachedDataset, provider: Provider, args: argparse.Namespace
) -> dict[str, Callable[[], float]]:
    """Build the baselines for a warm epoch; return variant name -> one timed epoch."""
    from ray import data as ray_data

    n = len(provider)
    items = [provider[i] for i in range(n)]
    gather_ds = GatherDataset(
        np.stack([it["image"] for it in items]), np.array([it["label"] for it in items])
    )
    start = time.perf_counter()
    raydata = ray_data.from_items(items).materialize()
    _log("   Ray Data materialize: %.1f s", time.perf_counter() - start)
    limit = min(n, args.raydata_items)
    return {
        "numpy gather (limit)": lambda: _epoch(_loader(gather_ds, _identity)),
        "dict cache, default_collate": lambda: _epoch(_loader(ListDataset(items))),
        "raycache, collate_fn=ds.collate": lambda: _epoch(_loader(ds, ds.collate)),
        "raycache, default_collate": lambda: _epoch(_loader(ds)),
        "Ray Data iter_torch_batches": lambda: _raydata_epoch(raydata, limit),
    }


def shape_bytes(shape: Sequence[int]) -> int:
    """Return the bytes of one float32 image of ``shape``.

    Parameters
    ----------
    shape : Sequence[int]
        The shape.

    Returns
    -------
    int
        Size in bytes.
    """
    return int(np.prod(shape)) * 4


# --------------------------------------------------------------------------- first epoch
@ray.remote
def _warm_worker() -> int:
    # Importing what a preload task needs (raycache, torch, the providers) is a one-off
    # cost of each new worker process; see ``startup``.
    import raycache.bench  # noqa: F401
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
    cache = raycache.DataCache(_config(name, args, preload=False), provider)
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
    name = _name("first")
    holder, _ = _attached(provider, args, name)
    warm_workers(args.num_cpus)
    start = time.perf_counter()
    ds = CachedDataset(provider, _config(name, args, preload=preload))
    _epoch(_loader(ds, ds.collate))
    ds.cache.flush()
    seconds = time.perf_counter() - start
    full = None
    if preload:
        ds.cache.wait_for_preload()
        full = ds.cache.stats()["preload"]["seconds"]
    holder.close()
    _close(ds)
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
    _log("== %s", scenario)
    provider = Provider(1, (1,))
    holder, attach = _attached(provider, args, _name("startup"))
    holder.close()
    raycache.drop_cache(holder.name)
    _log("   actor %.2f s", attach)
    rows = [Row(scenario, "new cache: directory actor created, client attached", attach, "s")]
    return rows


def _first_epoch_threads(provider: Provider, threads: int) -> tuple:
    start = time.perf_counter()
    cache = ThreadPoolCache(provider, threads)
    cache.start()
    _epoch(_loader(cache))
    seconds = time.perf_counter() - start
    cache.stop()
    return seconds, cache.done_at


def _first_epoch_nocache(provider: Provider) -> tuple:
    start = time.perf_counter()
    _epoch(_loader(provider))
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
    _log("== %s", scenario)
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
    return _compare(scenario, samples, "s", checks, notes)


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
            _log("   %-34s %8.2f s", name, seconds)
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
    _log("== %s", scenario)
    runs = {
        "raycache fill on miss": lambda: _first_epoch_raycache(provider, args, False),
        "no cache": lambda: _first_epoch_nocache(provider),
    }
    samples, _ = _first_epoch_samples(runs, args.first_rounds)
    # The target is a time ratio <= 1.15, i.e. a speed ratio >= 1/1.15.
    target = 1 / 1.15 if kind != "memory" else None
    checks = {"raycache fill on miss": {"no cache": target}}
    notes = {"raycache fill on miss": "includes the final flush"}
    return _compare(scenario, samples, "s", checks, notes)


# --------------------------------------------------------------------------- scale
_READY_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import ray
ray.init(address=sys.argv[1], logging_level="WARNING")
t1 = time.perf_counter()
from raycache import DataCache
from raycache.bench import Provider
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
        from raycache.memory import pss

        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        events = sum(e[2].nbytes + e[3].nbytes for e in self._events if e[0] == "add")
        return {
            "map_bytes": int(self._chunk_of.nbytes + self._row_of.nbytes),
            "event_log_bytes": int(events),
            "events": len(self._events),
            "chunks": len(self._refs),
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
    _log("== %s", scenario)
    provider = Provider(n, (32,))
    name = _name("scale")
    start = time.perf_counter()
    ds = CachedDataset(provider, _config(name, args, preload=True))
    actor = directory_actor(name, ds.cache.config.namespace)
    before = _actor_memory(actor)
    ds.cache.wait_for_preload()
    fill_s = time.perf_counter() - start
    after = _actor_memory(actor)
    _log("   filled in %.1f s: %s", fill_s, json.dumps(after))
    probes = [_ready_probe(name, n) for _ in range(args.first_rounds)]
    _close(ds)
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
    _log("   new client: %s", json.dumps(result))
    return result


# --------------------------------------------------------------------------- report
def _fmt_value(row: Row, spread: bool = False) -> str:
    if row.unit == "items/s":
        text = f"{row.value:,.0f} items/s"
        if spread and len(row.samples) > 1:
            text += f" ({min(row.samples):,.0f}–{max(row.samples):,.0f})"
        return text
    if row.unit == "s":
        text = f"{row.value:.2f} s"
        if spread and len(row.samples) > 1:
            text += f" ({min(row.samples):.2f}–{max(row.samples):.2f})"
        return text
    return f"{row.value:,.1f} {row.unit}"


def _fmt_ratio(row: Row, baseline: str) -> tuple[str, str]:
    ratio = row.ratios[baseline]
    target = row.targets.get(baseline)
    if target is None:
        return f"{ratio:.2f}x", ""
    met = "met" if ratio >= target else "**missed**"
    digits = 3 if abs(ratio - target) < 0.005 else 2  # never print 0.50x for a miss of 0.50x
    if row.unit == "s" and target < 1:  # the issue states fill targets as time ratios
        return (
            f"{ratio:.{digits}f}x (time {1 / ratio:.{digits}f}x)",
            f"time <= {1 / target:.2f}x: {met}",
        )
    return f"{ratio:.{digits}f}x", f">= {target:.2f}x: {met}"


def _target_row(row: Row) -> tuple[str, str] | None:
    limit = 2.0 if row.unit == "s" else 300.0
    if not row.scenario.startswith("scale"):
        return None
    return "", f"< {limit:g} {row.unit}: " + ("met" if row.value < limit else "**missed**")


def markdown_table(rows: Sequence[Row]) -> str:
    """Render rows as a markdown table: one line per comparison with its baseline.

    Parameters
    ----------
    rows : Sequence[Row]
        Measured rows.

    Returns
    -------
    str
        The table.
    """
    lines = [
        "| scenario | variant | median (min–max) | vs | ratio (>1: better) | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        comparisons = list(row.ratios) or [None]
        for baseline in comparisons:
            if baseline is None:
                target = _target_row(row)
                ratio, goal = ("", target[1]) if target else ("", "")
                vs = ""
            else:
                ratio, goal = _fmt_ratio(row, baseline)
                vs = baseline
            lines.append(
                f"| {row.scenario} | {row.variant} | {_fmt_value(row, spread=True)} | {vs} | "
                f"{ratio} | {goal} |"
            )
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Describe the machine and the versions the numbers were measured with.

    Returns
    -------
    dict
        Name -> description.
    """
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{mem:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores ({cpu}), {memory} memory, {platform.system()} "
        f"{platform.release()}",
        "load average at the end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": f"Python {platform.python_version()}, Ray {ray.__version__}, torch "
        f"{torch.__version__}, numpy {numpy.__version__}, raycache {raycache.__version__}",
    }


_ABOUT = """\
# Benchmarks

`raycache bench` (or `python benchmarks/run_benchmarks.py`) runs every scenario below and its
baselines in one process tree, in one run, on a private local Ray instance, and rewrites this
page and `benchmarks.png`. Every number is compared only with numbers from the same run.

## Workload

- **Items**: `{{"image": float32 array, "label": int}}`; 48 KiB images are 3x64x64, 1 KiB
  images are 256 floats. The provider builds each item with `np.full` (plus the delay below).
- **Warm epoch**: the whole dataset is cached first (raycache: preload; dict: a Python list of
  the provider's items; numpy: one stacked array; Ray Data: `from_items(...).materialize()`).
  Then shuffled epochs through `DataLoader(batch_size=64, shuffle=True, num_workers=0)`.
  Each variant runs {rounds} epochs, in rounds whose order rotates, after one warm-up epoch;
  the median epoch is reported, and each ratio is the median over rounds of the ratio
  within a round (the variants of a round run back to back, under the same load).
  Ray Data is timed over the first {raydata:,} items of each epoch
  (`iter_torch_batches(batch_size=64, local_shuffle_buffer_size=2000)`).
  - *numpy gather (limit)*: `__getitems__` does one fancy index per field on one in-process
    array; collate is the identity. Nothing can serve a shuffled batch faster in Python.
  - *dict cache*: Hyrax's cache kept warm in the trainer; the stock `default_collate`.
  - *raycache, collate_fn=ds.collate*: `CachedDataset.__getitems__` gathers the batch
    from the mapped chunks with one copy per field; `ds.collate` wraps the gathered arrays.
  - *raycache, default_collate*: the same items through the stock collate.
- **First epoch with preload**: the dataset is built (raycache starts its preload tasks; the
  thread-pool baseline starts {threads} threads filling a dict, as Hyrax's preloader does) and
  epoch 1 starts at once; the time is from building the dataset to the end of epoch 1, the
  final flush included. A miss that the preload has not reached is read by the trainer.
  The I/O provider sleeps 2 ms per item (releasing the GIL); the CPU provider runs a
  calibrated pure-Python loop of ~1 ms per item (holding the GIL; a fixed amount of work,
  {spin:,} iterations, not a deadline). raycache's preload runs in Ray worker processes,
  `preload_threads={threads}` reads in flight over all tasks; the thread pool is bound by
  the trainer's GIL for CPU work.
- **First epoch filling on miss**: no preload; every read of epoch 1 misses, reads the
  provider and inserts; against the same epoch reading the provider with no cache.
- **Scale**: a cache of {scale:,} items of 128 B is preloaded; a new process then attaches
  (`ray.init(address=...)`, `DataCache(...)`, first `try_fetch`), timed; the directory
  actor's memory is read inside the actor (`/proc/self/status` RSS, `smaps_rollup` PSS, and
  the map and event-log arrays).

## Caveats

- The machine is small and shared: other jobs were running (see the load average below).
  Absolute numbers move by tens of percent between runs, and single epochs by more; the
  paired ratios within one run are what to read, and the min–max range shows the spread.
- `num_workers=0` everywhere: it isolates the cost of reading the cache. With workers, every
  variant but raycache and numpy would also pay to send batches between processes.
- Ray's object-store pages are ordinary 4 KiB shared-memory pages (transparent huge pages
  are off for shared memory here), while a large numpy array in the trainer gets huge pages:
  the numpy limit reads memory with fewer TLB misses than any cache in shared memory can.
- {store}
- Chunks are sized by bytes (`chunk_size` unset, `chunk_bytes` 64 MiB): a warm 1 KiB batch
  of 64 shuffled rows touches ~12 chunks, against ~55 with `chunk_size = 1024` (its rows).
- First-epoch scenarios run in a rotating order, and a ratio is the median of the rounds'
  ratios. The preload rows run 5 rounds (`--preload-rounds`; 3 until 2026-12-03), their
  no-cache reference 2 (`--nocache-rounds`, compared by its median: it has no target and each
  of its epochs takes the provider's whole latency); the fill-on-miss rows run 3
  (`--first-rounds`). They are still the noisiest rows: with one round (the default until
  2026-12-02) the I/O-bound preload row read 0.85x in a full run where a 4-round run of the same
  code, minutes before, read 0.97x; on 2026-12-03 two full runs read 0.88x (3 rounds each)
  where `--only preload` runs of the same code read 0.99x and 1.02x.

## Environment

{env}

Command: `{argv}`; wall time of the whole run: **{wall:.0f} s**.

## Results

Ratios are oriented so that above 1 means raycache (or the row's variant) is better: items/s
divided by the baseline's items/s, or the baseline's seconds divided by the row's seconds.

{table}

![benchmarks](benchmarks.png)

{summary}

## What limits the missed targets

Profiles taken while building this benchmark (same machine, Nov 2026; CPU time per batch of
64 in the trainer, `time.process_time`, best of 9 passes), not regenerated by each run:

- **Warm 48 KiB with `ds.collate`** (and so the Ray Data ratio): one core's copy bandwidth.
  On a quiet machine (2026-12-02, load ~0) the dict ran at ~92k items/s and Ray Data at
  ~29k (twice its speed in loaded runs: its batches are built on a second thread), and this
  row fell to 1.25x the dict and 3.9x Ray Data. Per batch in the DataLoader: ~530 us, of which
  `__getitems__` ~460 us, ~390 us of it copying the 64 rows out of ~18 chunks one by one. The
  object store's 4 KiB pages are not what it costs: numpy's fancy index of one in-process
  array took 336 us with huge pages, 352 us without and 351 us from `/dev/shm`. Two Python
  threads each copying half the rows gained 8%; `torch.index_select` with torch's 2 threads
  took 175 us against numpy's 335 us. Since then a big batch is copied out of all its chunks
  with one `index_select` (`raycache/span_copy.py`): gather 420 -> 270 us; in two quiet runs
  1.60x the dict, 4.8-5.1x Ray Data and 0.93-0.95x the one-core numpy limit. Ray Data uses
  the second core too; 5x would need ~0.98x the numpy limit at its quiet speed.
- **Warm with the stock `default_collate`** (met since 2026-12-01): the stock collate used
  to stack every item again, so a safe read cost two copies against the dict's one (0.74x
  and 0.85x the dict). raycache now extends `default_collate_fn_map` so that the rows of a
  gathered batch, exactly and in order, collate to the gathered array itself: 1.36x (48
  KiB) and 1.57x (1 KiB) in the first run after the change.
- **Warm 1 KiB**: fixed costs per batch. With `chunk_size` unset (the default) chunks are
  sized by bytes and 200,000 items of 1 KiB fill ~15 chunks; with `chunk_size = 1024` they
  fill 196 and a shuffled batch touches ~55 of them (the `chunk_size=1,024` rows). In the
  runs of the change: 1.67x and 1.38x (byte-sized) against 1.42x and 1.38x (1,024 items).
  In-process profile of the byte-sized case: `__getitems__` + `collate` cost ~207 us of CPU
  per batch, ~50 us of it copying the image rows one by one out of the ~12 chunks the batch
  touches and ~50 us building the label column; the rest is Python per batch. The dict
  cache runs at ~460-500 us per batch, so 1.8x needs ~260-280 us per batch with the
  DataLoader's own ~20-30 us. On 2026-12-02 a `GatheredBatch` stopped building its items
  (a dict and a row view per item) until it is used as a list, which `ds.collate` never
  does: ~25-30 us of a ~400 us batch. In an A/B of two alternating runs (200,000 items,
  4 rounds each) the median went from 1.60x and 1.72x to 1.99x and 2.02x the dict cache.
- **First epoch with preload, I/O-bound**: 2 tasks of 4 threads (`preload_threads=8`, 2
  CPUs). Units are a probe of 32 items per task, then shares of what is left (~1,000, ~750,
  ... items; at least ~0.05 s of reading each). The cache is full after ~1.4-1.9 s where the
  8 pool threads finish in ~1.05-1.2 s. One unit of 1,008 items read alone took 0.61 s
  against 0.50 s of sleeping: each 2 ms sleep in a thread takes ~2.3 ms (the pool pays the
  same), then `np.stack` into the chunk takes ~54 ms and the task's return is written into
  the object store; the pool's items go into a dict without a copy, and its trainer thread
  reads misses as a ninth reader. Before the unit change (units of 1,024 items): 0.61-0.74x.
  Timeline of the preload alone (2026-12-01, 4,096 items, no trainer reading): the two large
  units ended at 0.70 s and 1.18 s, then ~10 shrinking units took 0.93 s for the last 2,268
  items where 8 busy readers need ~0.57 s. At each unit's end its slot was idle while the
  chunk was stacked and written, the actor saw the result and the next task was leased.
  Since then each slot is one generator task that claims its next unit before the current
  one ends and streams chunks back: the preload alone took 1.5-1.8 s, and this row went to
  0.76-0.90x. Later on 2026-12-01 each reader thread began copying its item into the
  unit's chunk as it is read, into column buffers the task reuses (stacking a unit went from
  64-197 ms to ~1 ms), and a batch reads the misses no unit holds before it waits. Trace of
  the preload alone after that: the cache full at 1.3-1.45 s (was 1.5-1.8 s). Reads alone
  (2 Ray tasks of 4 threads, no chunk, no store; the same run) took 1.17-1.45 s for 4,096
  items and an 8-thread pool in one process 1.18-1.42 s: the preload is now within ~0.1 s
  of bare reading with 8 readers; the per-read time is ~2.9 ms against the pool's ~2.3 ms
  when trainer, actor and store work share the 2 cores. What is left: the pool's trainer
  reads its misses as a ninth reader throughout, while units hold ~70% of the indices
  within 0.2 s of the start, so this trainer mostly waits for units (it stored 0 of 4,096
  items; 219 with units capped at 0.15 s, which made the epoch no faster). Ratios in A/B
  runs after the change: 0.70-1.02x, median ~0.8x. Measured again on 2026-12-02, with a
  provider that logs each read's start and end in the tasks (4,096 items, no trainer):
  - Reads in the tasks take 2.7-2.9 ms each against 2.06 ms of sleep.
  - The first read starts 0.05-0.07 s after the preload does.
  - Both tasks keep 3-4 reads in flight nearly all the time.
  - The same reads in two plain processes of 4 threads (no Ray) take 2.25-2.4 ms, and so do
    sleeps alone in Ray tasks (2.15-2.35 ms). What costs ~0.4 ms per read is the per-read
    work (item, copy into the chunk) inside a Ray worker process while the store, the actor
    and the raylet share the 2 cores.
  - Ray runs workers at nice 15, against 0 for the trainer and its pool threads. With
    `worker_niceness = 0` the ratio did not change (0.74-1.02x, 4 rounds each).
  - The trainer, with a batch read that no longer waits for a unit before reading the
    misses no unit holds (fixed on 2026-12-02), read ~200 of 4,096 items. An A/B against
    the day before gave the same ratios (0.76-1.01x).
  - Later on 2026-12-02, in one process that alternated the variants (8 rounds; the thread
    pool's epochs in the same rounds moved between 1.13 and 1.53 s), medians of the whole
    first epoch:
    - 1.59 s with one `ThreadPoolExecutor` future per read;
    - 1.47 s with reader threads that take reads from one queue and wake the task's main
      thread once per unit (`raycache/readers.py`). On this virtual machine a read's 2 ms
      sleep costs ~140 us of CPU, and the futures ~100 us more;
    - 1.41 s when, in addition, the trainer reads items no unit has reached while it waits
      for a unit (~440 of 4,096).
  - Ratio against the pool: 0.81x, 0.90x and 0.93x in that A/B.
  - Timeline of the last variant: the first read 0.05 s after the dataset is built. The
    trainer waits for units through its third batch (~0.7-0.95 s). The cache is full at
    ~1.2-1.5 s, and the last ~60 batches then take 0.08-0.1 s at warm-read speed. The
    pool's trainer gets through those batches while the pool is still reading.
  - Quiet machine, later on 2026-12-02 (load ~0): the preload alone filled the cache in
    1.14-1.18 s, the 8-thread pool alone in 1.11-1.18 s. With the trainer, a task's read
    took 2.24-2.37 ms (2.19-2.22 alone; the sleep is 2.09 ms); the trainer read 420-465
    items and had none left to read for the last ~0.1 s (every unit handed out); the epoch
    ended ~45 ms after the last read (the last unit's registration, then ~60 batches at warm
    speed). The pool's trainer ended ~0.2 s after its pool. Ratios: 0.90x in the full run,
    a median of 0.96x over 4 rounds. Over three probes of each, both used under one of the
    two CPUs, and raycache's epochs (1.15-1.28 s) and the pool's (1.15-1.20 s) overlapped.
  - Tried on 2026-12-02, evening, alternating in one process (6 rounds per variant, 4,096
    items), none kept:
    - Units of at most ~0.1 s of reading while reads mostly wait, so that the trainer keeps
      finding items no unit holds (with shares of what is left, the two slots hold ~3,600 of
      the 4,096 items ~0.1 s after the start). 0.92-1.05x the pool against 0.89-0.99x in 7
      A/Bs. The 28 small chunks this makes slow shuffled reads: 20,000 items of 48 KiB read
      at 255k items/s in 1,365-item chunks, 246k in 300-item chunks and 199k in 150-item
      chunks. Merging them in the actor, as inserted segments are, left a chunk of freed
      store pages resident: the memory test's preload stored 96 MB of data in 160 MB of
      store (the bound is 1.1x). With a CPU-bound provider they cost ~4% (1.61x against
      1.67x the pool) unless the units stay long when reads keep a core busy.
    - Spare reads kept away from where the next units are handed out, by as many indices
      as the units in flight hold. Items read twice (a spare or a batch miss that a unit
      also read) fell from 128-350 to 65-123 per epoch, but the trainer ran out of spares
      sooner: a median of 1.17 s against 1.14 s.
    - One task of 8 threads instead of two of 4: 0.94x against 0.89x in one run, 1.04x
      against 1.04x in another.
  - Late on 2026-12-02, a trace of every read with its process (3 rounds) showed what the
    trainer's reads were worth: it read ~450 items and 225-345 of them were read again by a
    task. Those were its first batches' misses, read before it had heard of the units
    claimed meanwhile, and spares that units reached before the trainer's insert arrived.
    The trainer now reserves what it reads (`raycache/reservations.py`): 0 items read twice
    in 3 rounds, the trainer reading ~360 items. Alternating with the pool in one process, 8
    rounds: 0.93x before, 1.00x with the batch misses reserved, 1.01x with the spares
    reserved too (handed out by the actor from the top down); CPU-bound 1.66x. In the first
    `bench --only preload` run after it (4 rounds): 0.97x, with medians of 1.16 s against
    the pool's 1.18 s; in a full run, 0.91x (raycache 1.11-1.22 s, the pool 1.01-1.20 s).
    Then the next unit claimed only when the current one's last reads start: 0.97-0.99x
    against 0.96-0.97x in A/Bs, and 0.93x in the full run of this report (raycache 1.12-1.25
    s, the pool 1.02-1.17 s; the pool's epochs are shorter in full runs than alone, medians
    of 1.06-1.16 s in the A/Bs). What is left: the 8 task readers alone need ~0.99 s for the
    ~3,700 items the trainer does not read (2.13 ms a read), the two slots end up to ~45 ms
    apart, and for the last ~0.1 s every item is in a unit, so the trainer has nothing to
    read. Tail units of at least 0.025 s instead of 0.05 s: 0.99x against 1.01x (8 rounds),
    not kept.
  - 2026-12-03. The actor's first reservation imported `numpy.ma` (~12 ms, inside the first
    `np.unique`) while the trainer waited for its first batch; raycache imports it up front.
    Spare blocks now grow from 8 to 64 within a wait: ~36 reservation calls an epoch became
    ~20. A paired A/B, 16 rounds: 1.03x the pool before those and that day's other client
    changes, 1.10x after. A trace of every read by thread then showed each reader thread idle
    23-37 ms per run at unit ends, waiting for the claim of its next unit: the claim now goes
    out two reads per thread ahead (~3 ms idle). `--only preload` went from 0.99x to 1.02x.
    Full runs that day still read 0.88x twice. Those runs' first raycache round was always the
    slowest (1.41-1.51 s against 1.2-1.3 s). In that round a task took 0.28 s to yield a 48 MB
    chunk, its workers used ~0.9 s of CPU each against ~0.3 s, and later rounds took 0.013 s
    per chunk: the first write into store pages never used before. The store's allocator
    places chunks anywhere, so any round could pay it. The bench now preallocates the store
    (the same yield: 0.022 s in the first round). The first full run with it read 1.06x
    (raycache 1.18-1.48 s, the pool 1.10-1.47 s, on a slow host: no cache 9.0-9.2 s).
- **First epoch with preload, CPU-bound**: 1.66x, 1.89x and 1.68x in runs since units
  shrink towards the end (1.40-1.45x before: with whole-chunk units, one task read the last
  unit alone while the other core idled); 1.34x and 1.42x with tail units of at least 0.2 s
  of reading (200 items here), hence the 0.05 s floor. The two preload workers, the trainer (reading
  misses the preload has not reached) and the directory actor share 2 cores with the other
  jobs on this machine. Those 2 cores do not double pure-Python work: two processes
  each running the same loop took 1.3-1.9 s for what takes ~1.0 s alone (2026-12-02), so
  2 CPU-bound tasks give ~1.1-1.5x one core, not 2x. The 1.6x target needs the pool to
  lose more than that to its GIL.
- **Start-up** (not in the first-epoch rows): a new cache's actor takes ~0.3-0.4 s since
  raycache imports torch only where a tensor is met (~2.5 s before). Ray kills the workers
  still leased to a cache's actor when the actor is killed, so a cache dropped right after
  its preload leaves no warm workers.
- **Fill on miss** (the CPU-bound row when it misses, and the no-cost provider, which has
  no target): for 20,000 items of 48 KiB the trainer's main thread used 1.5 s of CPU in a
  3.7 s epoch; per item `data_size` ~43 us and `copy_item` ~34 us (cProfile), and the
  flush thread (building chunks, sending them) used ~0.8 s more of the same process.
  Until 2026-12-01 every flush also made the trainer's next miss sync with an actor busy
  storing or compacting (2,048 items, 2 ms I/O: ~36 syncs, 0.24-0.34 s on the trainer's
  thread). Inserts now get the map's changes in their reply and compaction runs outside the
  actor's lock: ~20 syncs, 0.08-0.09 s, and the I/O-bound epoch went from 1.13-1.16x to
  1.08x the no-cache time in one process, same quiet machine. The CPU-bound provider holds
  the trainer's GIL, which the flush thread needs to build and send chunks (its sends took
  ~2.5-3.4 s of wall time in a 2.7-3.8 s epoch): 1.24-1.48x the no-cache time in the same
  A/B, and the remaining cost is that contention on 2 shared cores. Later on 2026-12-01 an
  insert began copying the item once, into the columns of the chunk it is sent in, instead
  of a private copy the flush thread then stacked: per 48 KiB item ~150-180 us of GIL-holding
  work (61-68 us `copy_item` and size, 88-110 us `from_rows`) became ~40 us. With a fixed
  11,880 spin iterations per item the epoch took 2.57-2.75 s (mean 2.63) against 2.48-2.89 s
  (mean 2.70) before, 3 rounds in each of 2 alternating processes; the no-cache epoch in the
  same processes moved between 1.53 and 2.29 s, so the ratio is mostly the noise of the
  baseline: 1.15-1.69x after, 1.14-1.32x before. The rest of the cost is outside the
  trainer's thread: the actor stores each segment (`ray.put`) and copies it again when it
  compacts segments into a chunk, on the same 2 cores. On 2026-12-02, per 2,048-item epoch
  (in-process timers, quiet machine):
  - The trainer's blocking syncs cost 0.08-0.14 s (4-7 ms each: the actor stored segments
    holding its lock). Batch reads of a process filling the cache alone now send their
    sync ahead and apply the reply at a later miss: ~1 ms per batch.
  - `insert_into_cache` costs ~70-90 us per item between 1 ms spins, against ~14 us for the
    same copy in a tight loop: caches go cold in the spin.
  - The provider's own calls ran 0.1-0.2 s slower in the cache's epoch than in the
    no-cache one: the other core copies into the store, and the trainer's process burns
    ~0.3 s more CPU in Ray's threads.
  - A/B against the day before (4 rounds in each of 2 alternating processes): 1.10-1.68x
    (median ~1.44x) before, 0.94-1.47x (median ~1.18x) after.
  - Later on 2026-12-02 an insert validates and flattens the item in one walk. An A/B
    (8 rounds each) gave medians of ~1.19x before and ~1.25x after, a spread (0.96-1.78x)
    of the no-cache baseline's noise: its epoch moved between 1.44 and 2.48 s for the same
    work. No change is visible at this noise.
  - Later on 2026-12-02 (2,048 items, in-process timers, rounds after the first): reads
    of the provider took 1.11-1.12 ms each in the cache's epoch against ~0.95-1.0 ms in
    the no-cache one, about half of the gap. This machine's two vCPUs act like two hardware
    threads of one core: a pure-Python loop pinned to one ran ~40% slower (0.24 -> 0.34 s)
    while another ran on the other, and no slower while the other copied memory. Meanwhile
    the directory actor used 0.25-0.47 s of CPU per epoch and the raylet ~0.08 s;
    `insert_into_cache` cost ~28 us per item without a spin and 50-60 us between spins. With
    `flush_interval_s = 2.0` instead of 0.1 (fewer inserts, segments and compactions) one
    run of 3 rounds gave 1.09-1.14x against 1.22-1.32x at 0.1. The default stays 0.1 s:
    it is how soon other processes see an insert.
  - Since 2026-12-02 a process that fills the cache alone sends a chunk's worth at a time
    (or after 2 s, or once it stops inserting), so the actor merges nothing. In one process,
    8 rounds alternated: the actor's CPU per epoch 0.44 -> 0.18 s, the epoch a median 1.20x
    -> 1.15x the no-cache one (ratios 1.05-1.49x before, 0.94-1.58x after). A day of host
    noise moves single rounds more than that.
"""


def _summary(rows: Sequence[Row]) -> str:
    met, missed = [], []
    for row in rows:
        for baseline, target in row.targets.items():
            ratio = row.ratios[baseline]
            line = (
                f"{row.scenario}: {row.variant} vs {baseline}: {ratio:.2f}x (target {target:.2f}x)"
            )
            (met if ratio >= target else missed).append(line)
        goal = _target_row(row)
        if goal is not None:
            line = f"{row.scenario}: {row.variant}: {_fmt_value(row)} ({goal[1].split(':')[0]})"
            (met if "met" in goal[1] and "missed" not in goal[1] else missed).append(line)
    out = ["### Targets", "", f"Met ({len(met)}):", ""] + [f"- {m}" for m in met]
    out += ["", f"Missed ({len(missed)}):", ""] + [f"- {m}" for m in missed or ["none"]]
    return "\n".join(out)


def write_report(args: argparse.Namespace, rows: Sequence[Row], info: dict, table: str) -> None:
    """Write ``benchmarks.md`` and ``benchmarks.png`` into ``args.out``.

    Parameters
    ----------
    args : argparse.Namespace
        Options (``out`` and the sizes described in the page).
    rows : Sequence[Row]
        Results.
    info : dict
        Wall time, arguments, scale details.
    table : str
        The markdown table.
    """
    args.out.mkdir(parents=True, exist_ok=True)
    env = "\n".join(f"- {k}: {v}" for k, v in environment().items())
    if args.no_preallocate_store:
        store = (
            "The object store was not preallocated (`--no-preallocate-store`): the first write "
            "of each of its pages is slow (see below), wherever the store puts a chunk."
        )
    else:
        store = (
            f"The object store's {args.object_store_mb:,} MiB are preallocated when Ray starts "
            f"(Ray's `preallocate_plasma_memory`; Ray was up after {info.get('ray_up_s', 0):.1f} "
            "s). A store page costs most the first time it is written: here a preload task "
            "wrote a 48 MB chunk in 0.28 s into fresh pages and in 0.013 s into pages written "
            "before (2026-12-03), and the store's allocator puts each chunk where it likes, so "
            "without this some first-epoch rounds pay ~0.5 s more than others. A one-off cost "
            "per Ray start, like the directory actor's start-up; `docs/memory.md` says how to "
            "preallocate a store."
        )
    page = _ABOUT.format(
        store=store,
        rounds=args.rounds,
        raydata=args.raydata_items,
        threads=args.threads,
        spin=info.get("spin_iterations_per_ms", 0),
        scale=args.scale_items,
        env=env,
        argv=" ".join(["raycache bench", *info["argv"]]),
        wall=info["wall_s"],
        table=table,
        summary=_summary(rows),
    )
    (args.out / "benchmarks.md").write_text(page)
    plot(rows, args.out / "benchmarks.png")
    _log("wrote %s", ", ".join(str(args.out / f) for f in ("benchmarks.md", "benchmarks.png")))


def plot(rows: Sequence[Row], path: Path) -> None:
    """Draw one panel per scenario family: warm throughput, first-epoch times.

    Parameters
    ----------
    rows : Sequence[Row]
        Results.
    path : Path
        The PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [
        ("warm epoch, 48 KiB", "items/s", "warm epoch, 48 KiB items (items/s, log)"),
        ("warm epoch, 1 KiB", "items/s", "warm epoch, 1 KiB items (items/s, log)"),
        ("first epoch with preload", "s", "first epoch with preload (s)"),
        ("first epoch filling", "s", "first epoch filling on miss (s)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    for ax, (prefix, unit, title) in zip(axes.flat, families):
        chosen = [r for r in rows if r.scenario.startswith(prefix) and r.unit == unit]
        _bars(ax, chosen, log=unit == "items/s")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, rows: Sequence[Row], log: bool) -> None:
    if not rows:
        ax.set_visible(False)
        return
    labels = [_short(r) for r in rows]
    colors = ["tab:orange" if r.variant.startswith("raycache") else "tab:gray" for r in rows]
    positions = range(len(rows))
    ax.barh(positions, [r.value for r in rows], color=colors)
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.invert_yaxis()
    top = max(r.value for r in rows)
    if log:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(right=top * 4)  # room for the value labels
    else:
        ax.set_xlim(0, top * 1.3)
    for pos, row in zip(positions, rows):
        ax.text(row.value, pos, " " + _fmt_value(row), va="center", fontsize=7)


def _short(row: Row) -> str:
    detail = row.scenario.split(",")[1].strip() if "," in row.scenario else ""
    if row.scenario.startswith("warm"):
        return row.variant
    return f"{detail.replace(' per item', '')}: {row.variant}"


# --------------------------------------------------------------------------- running
SCENARIOS = ("warm", "preload", "fill", "scale")


def run_scenarios(args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Run the selected scenarios in this process, with Ray already started.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options (see ``parse_args``).

    Returns
    -------
    tuple
        All rows, and extra information (the scale scenario's numbers, calibration).
    """
    rows: list[Row] = []
    info: dict = {}
    only = set(args.only)
    if "warm" in only:
        rows += warm(args, args.warm_large_items, (3, 64, 64), "48 KiB")
        rows += warm(args, args.warm_small_items, (256,), "1 KiB")
    iterations = calibrate_spin(0.001) if only & {"preload", "fill"} else 0
    info["spin_iterations_per_ms"] = iterations
    shape = (3, 64, 64)
    io = Provider(args.preload_items, shape, latency_s=0.002)
    cpu = Provider(args.preload_items, shape, spin_iterations=iterations)
    if only & {"preload", "fill"}:
        rows += startup(args)
    if "preload" in only:
        rows += preload(args, "io", io)
        rows += preload(args, "cpu", cpu)
    if "fill" in only:
        rows += fill(args, "io", Provider(args.fill_items, shape, latency_s=0.002))
        rows += fill(args, "cpu", Provider(args.fill_items, shape, spin_iterations=iterations))
        rows += fill(args, "memory", Provider(args.warm_large_items, shape))
    if "scale" in only:
        scale_rows, info["scale"] = scale(args)
        rows += scale_rows
    return rows, info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the benchmark's options.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments; default ``sys.argv[1:]``.

    Returns
    -------
    argparse.Namespace
        The options.
    """
    p = argparse.ArgumentParser(
        prog="raycache bench",
        description="Run raycache's benchmark suite and write docs/benchmarks.md and .png.",
    )
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--warm-large-items", type=int, default=20_000, help="48 KiB items")
    p.add_argument("--warm-small-items", type=int, default=200_000, help="1 KiB items")
    p.add_argument("--preload-items", type=int, default=4096)
    p.add_argument("--fill-items", type=int, default=2048)
    p.add_argument("--scale-items", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=5, help="warm epochs per variant (median)")
    p.add_argument(
        "--first-rounds", type=int, default=3, help="first epochs per variant (fill on miss)"
    )
    p.add_argument(
        "--preload-rounds", type=int, default=5, help="first epochs per variant (preload)"
    )
    p.add_argument(
        "--nocache-rounds",
        type=int,
        default=2,
        help="of those, epochs without a cache (a reference; each takes the whole latency)",
    )
    p.add_argument("--raydata-items", type=int, default=20_000, help="items per Ray Data epoch")
    p.add_argument("--threads", type=int, default=8, help="preload_threads and pool size")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="raycache.chunk_size (default: by bytes)"
    )
    p.add_argument(
        "--small-chunk-size",
        type=int,
        default=1024,
        help="also time the 1 KiB warm epoch with this chunk_size (0: skip)",
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--object-store-mb", type=int, default=4096)
    p.add_argument(
        "--no-preallocate-store",
        action="store_true",
        help="leave the object store's pages to be faulted in by their first writes",
    )
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the report goes")
    p.add_argument("--no-report", action="store_true", help="print the table only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite (``raycache bench``).

    Starts a private local Ray instance (never attaches to one that is running, whose
    other work would disturb the timings), runs the scenarios, shuts Ray down and writes
    the report.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (see ``raycache bench --help``).

    Returns
    -------
    int
        0 on success.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    # A page of the object store costs most the first time it is written: ~2.5-6 ms per
    # MB here, against ~0.3 ms once it is resident. The store's allocator puts each round's
    # chunks wherever it likes, so without this some rounds of a first-epoch scenario pay
    # that and some do not. Preallocating moves the cost to Ray's start (reported).
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        object_store_memory=args.object_store_mb * MIB,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _system_config={"preallocate_plasma_memory": not args.no_preallocate_store},
    )
    ray_up_s = time.perf_counter() - start
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        _log("ray up after %.1f s", ray_up_s)
        rows, info = run_scenarios(args)
        info["ray_up_s"] = ray_up_s
    finally:
        ray.shutdown()
    info["wall_s"] = time.perf_counter() - start
    info["argv"] = list(sys.argv[1:] if argv is None else argv)
    table = markdown_table(rows)
    print(table)
    if not args.no_report:
        write_report(args, rows, info, table)
    _log("total wall time %.0f s", info["wall_s"])
    return 0
