"""One trainer process of the busy-node scenarios: warm epochs on command, timed.

``benchmarks.busy`` starts K of these per way of reading (dict cache, raycache with
``ds.collate``, raycache with the stock collate). Each prepares its dataset (builds
its dict, or attaches to the preloaded cache and maps it with one epoch), prints
``READY`` and then, for every ``go`` line on stdin, runs its epochs and prints
``RESULT {"items": ..., "start": ..., "end": ...}`` (``time.monotonic``, which is one
clock for every process of the machine), until stdin closes. Started with
``python -m benchmarks.busy_trainer MODE N EPOCHS CACHE_NAME`` and ``RAY_ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["main"]


def _dataset(mode: str, n: int, cache_name: str) -> tuple:
    """Return ``(dataset, collate_fn)`` for a way of reading."""
    from benchmarks.baselines import ListDataset
    from benchmarks.common import cache_config
    from benchmarks.providers import Provider

    provider = Provider(n, (3, 64, 64))
    if mode == "dict":
        return ListDataset([provider[i] for i in range(n)]), None
    from raycache.dataset import CachedDataset

    options = argparse.Namespace(threads=2, chunk_size=None)
    ds = CachedDataset(provider, cache_config(cache_name, options, preload=True))
    ds.cache.wait_for_preload()
    return ds, (ds.collate if mode == "collate" else None)


def _copies() -> dict:
    """Return the copies of each way raycache's batch copy has timed in this process."""
    from raycache.copy_choice import CHOOSER

    seen = CHOOSER.snapshot()
    return {"pool": seen["pool"]["samples"], "one_thread": seen["one_thread"]["samples"]}


def main(argv: list[str] | None = None) -> int:
    """Run the trainer (see the module docstring).

    Parameters
    ----------
    argv : list of str, optional
        ``MODE N EPOCHS CACHE_NAME``; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 once stdin is closed.
    """
    from benchmarks.common import make_loader, timed_epoch

    mode, n, epochs, cache_name = (sys.argv[1:] if argv is None else argv)[:4]
    dataset, collate_fn = _dataset(mode, int(n), cache_name)
    timed_epoch(make_loader(dataset, collate_fn))  # warm-up: maps chunks, faults pages
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        start = time.monotonic()
        items = 0
        for _ in range(int(epochs)):
            timed_epoch(make_loader(dataset, collate_fn))
            items += len(dataset)  # every item, once per epoch
        end = time.monotonic()
        result = {"items": items, "start": start, "end": end, "copies": _copies()}
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
