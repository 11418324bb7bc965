"""The sweep benchmark's row (benchmarks/sweep.py), run small: what it counts is right.

Each job is a separate driver process. A detached cache must let only the sweep's first
job read the provider, however many jobs follow, and must be gone when the row is done.
"""

from __future__ import annotations

import argparse

import raycache
from benchmarks.suite import export_source_tree
from benchmarks.sweep import VARIANTS, sweep

ITEMS, JOBS, EPOCHS = 96, 2, 2


def test_sweep_counts_reads_and_drops_its_cache(ray_address):
    export_source_tree()  # the sweep's job processes import ``benchmarks``
    before = set(raycache.list_caches(namespace=None))
    args = argparse.Namespace(sweep_jobs=JOBS, sweep_epochs=EPOCHS, sweep_items=ITEMS, threads=4)
    rows = sweep(args)
    reads = {r.variant: r.value for r in rows if r.unit == "reads"}
    walls = {r.variant: r.value for r in rows if r.unit == "s"}
    per_job = {r.variant: r.note for r in rows if r.unit == "reads"}
    assert set(reads) == set(walls) == set(VARIANTS)
    # The first job reads every item (a trainer's miss may race the preload for one);
    # the jobs after it read nothing.
    first, *later = (int(n) for n in per_job["raycache detached"].split(": ")[1].split(", "))
    assert ITEMS <= first <= ITEMS + ITEMS // 10 and later == [0] * (JOBS - 1)
    assert reads["no cache"] == ITEMS * JOBS * EPOCHS
    # Each job fills its own dict; a trainer's miss may race the pool for an item.
    assert ITEMS * JOBS <= reads["dict cache per job"] < ITEMS * JOBS * EPOCHS
    assert all(w > 0 for w in walls.values())
    # No cache of the sweep's is left (other modules' caches may come and go meanwhile).
    assert set(raycache.list_caches(namespace=None)) <= before
