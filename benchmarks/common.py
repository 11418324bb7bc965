"""What every scenario does the same way: cache configs and names, timed epochs, rounds."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

import raycache
from benchmarks.providers import BATCH
from raycache.dataset import CachedDataset

__all__ = [
    "cache_config",
    "export_source_tree",
    "close_cache",
    "log",
    "make_loader",
    "run_rounds",
    "timed_epoch",
    "unique_name",
]

logger = logging.getLogger(__name__)


def cache_config(name: str, args: argparse.Namespace, preload: bool, **raycache_keys: Any) -> dict:
    return {
        "data_set": {
            "use_cache": True,
            "preload_cache": preload,
            "preload_threads": args.threads,
        },
        "raycache": {"name": name, "chunk_size": args.chunk_size, **raycache_keys},
    }


def unique_name(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


def timed_epoch(loader: Iterable) -> float:
    """Run one epoch; return items per second."""
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def make_loader(dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
    kwargs = {} if collate_fn is None else {"collate_fn": collate_fn}
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0, **kwargs)


def run_rounds(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order; return all samples."""
    names = list(variants)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(variants[name]())
            logger.info("  %-34s %12.0f", name, samples[name][-1])
    return samples


def close_cache(ds: CachedDataset) -> None:
    ds.cache.close()
    raycache.drop_cache(ds.cache.name)


def log(msg: str, *args: Any) -> None:
    print(msg % args if args else msg, flush=True)


def export_source_tree() -> None:
    """Put the folder holding ``benchmarks/`` on ``PYTHONPATH`` for the processes to come.

    Preload tasks unpickle ``benchmarks.providers.Provider`` by reference in Ray's worker
    processes, and the scale scenario's probe imports it in a new process: both inherit
    this environment (a local Ray's raylet starts the workers), and neither would find
    ``benchmarks`` otherwise unless it was started from the source tree.
    """
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
