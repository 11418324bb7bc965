"""Warm epochs: a fully cached dataset read in shuffled batches, against the alternatives.

raycache (``ds.collate`` and the stock ``default_collate``) is compared with the numpy
fancy-index gather (the memory-bandwidth limit), a plain in-process dict cache (what Hyrax
keeps) and Ray Data (``materialize`` + ``iter_torch_batches`` with a local shuffle buffer),
for 48 KiB and 1 KiB items. Every variant runs once per round, in an order that rotates,
after one warm-up epoch each.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.baselines import GatherDataset, ListDataset, identity
from benchmarks.common import (
    cache_config,
    close_cache,
    log,
    make_loader,
    run_rounds,
    timed_epoch,
    unique_name,
)
from benchmarks.providers import BATCH, KIB, Provider, shape_bytes
from benchmarks.results import Row, compare
from raycache.dataset import CachedDataset

__all__ = ["preloaded", "warm"]


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
    log("== %s", scenario)
    provider = Provider(n, shape)
    start = time.perf_counter()
    ds = preloaded(provider, args, f"warm{label}")
    log(
        "   raycache preload: %.1f s, %d chunks",
        time.perf_counter() - start,
        ds.cache.stats()["chunks"],
    )
    variants = _warm_variants(ds, provider, args)
    big = shape_bytes(shape) >= 16 * KIB
    extra = None
    if not big and args.small_chunk_size:
        extra = _add_small_chunks(variants, provider, args)
    for fn in variants.values():  # warm-up: map chunks, fault pages in, start Ray Data
        fn()
    samples = run_rounds(variants, args.rounds)
    variants.clear()  # frees the baselines' copies of the data
    for cached in (ds, extra):
        if cached is not None:
            close_cache(cached)
    gc.collect()
    notes = {
        "Ray Data iter_torch_batches": f"first {min(n, args.raydata_items):,} items of each epoch",
        "numpy gather (limit)": "one fancy index per field from one in-process array",
    }
    return compare(scenario, samples, "items/s", _checks(samples, big), notes)


def preloaded(provider: Provider, args: argparse.Namespace, tag: str, **keys: Any) -> Any:
    """Build a ``CachedDataset`` over ``provider``; return it once its preload is done."""
    ds = CachedDataset(provider, cache_config(unique_name(tag), args, preload=True, **keys))
    ds.cache.wait_for_preload()
    return ds


def _add_small_chunks(
    variants: dict[str, Callable[[], float]], provider: Provider, args: argparse.Namespace
) -> Any:
    """Add the same cache in chunks of ``--small-chunk-size`` items to ``variants``.

    Byte-sized chunks of 1 KiB items are large, so a shuffled batch touches few of them;
    these rows show what a fixed, smaller chunk costs. Returns the extra dataset, which
    the caller closes.
    """
    extra = preloaded(provider, args, "warm1k", chunk_size=args.small_chunk_size)
    tag = f"chunk_size={args.small_chunk_size:,}"
    variants[f"raycache, ds.collate, {tag}"] = lambda: timed_epoch(
        make_loader(extra, extra.collate)
    )
    variants[f"raycache, default_collate, {tag}"] = lambda: timed_epoch(make_loader(extra))
    return extra


def _checks(samples: dict[str, list[float]], big: bool) -> dict[str, dict[str, float | None]]:
    """Return the targets: variant -> baseline -> the ratio asked for (None: reported only)."""
    # Issue 23's quiet targets: 1.5x the dict and 0.7x the limit for 48 KiB items, 2.5x
    # and 0.5x for 1 KiB items.
    checks: dict[str, dict[str, float | None]] = {
        "raycache, collate_fn=ds.collate": {
            "dict cache, default_collate": 1.5 if big else 2.5,
            "numpy gather (limit)": 0.7 if big else 0.5,
            "Ray Data iter_torch_batches": 5.0 if big else None,
        },
        "raycache, default_collate": {"dict cache, default_collate": 1.0 if big else 0.85},
        "Ray Data iter_torch_batches": {"dict cache, default_collate": None},
    }
    for variant in samples:
        if "chunk_size=" in variant:
            checks[variant] = {"dict cache, default_collate": None}
    return checks


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
    log("   Ray Data materialize: %.1f s", time.perf_counter() - start)
    limit = min(n, args.raydata_items)
    return {
        "numpy gather (limit)": lambda: timed_epoch(make_loader(gather_ds, identity)),
        "dict cache, default_collate": lambda: timed_epoch(make_loader(ListDataset(items))),
        "raycache, collate_fn=ds.collate": lambda: timed_epoch(make_loader(ds, ds.collate)),
        "raycache, default_collate": lambda: timed_epoch(make_loader(ds)),
        "Ray Data iter_torch_batches": lambda: _raydata_epoch(raydata, limit),
    }


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
