"""Warm epochs on a busy node: what a trainer sees when it does not have the machine.

A training node is never idle: other trainers, their DataLoader workers and Ray's own
processes share the cores. Three conditions, each against the dict cache (Hyrax's)
measured in the same conditions at the same time, rounds interleaved:

a. one trainer while another process keeps one core busy (a spinning Python loop);
b. K trainer processes reading warm epochs at once, each with its own dict against K
   attached to one raycache: aggregate items/s (every item read by every trainer,
   over the time from the common start to the last trainer's end);
c. the same under ``OMP_NUM_THREADS=1``, as ``torchrun`` sets it.

48 KiB items (3x64x64 float32), shuffled, batch 64, ``num_workers=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import ray

from benchmarks.baselines import GatherDataset, ListDataset, identity
from benchmarks.common import close_cache, log, make_loader, run_rounds, timed_epoch
from benchmarks.providers import Provider
from benchmarks.results import Row, compare
from benchmarks.warm import preloaded

__all__ = ["busy", "spinner"]

SHAPE = (3, 64, 64)
# Ways a trainer reads, as ``benchmarks.busy_trainer`` names them, and their row names.
MODES = {
    "dict": "dict cache, default_collate",
    "collate": "raycache, collate_fn=ds.collate",
    "stock": "raycache, default_collate",
}
CHECKS = {
    "raycache, collate_fn=ds.collate": {
        "dict cache, default_collate": 1.3,
        "numpy gather (limit)": None,
    },
    "raycache, default_collate": {"dict cache, default_collate": 1.0},
}
WAIT_S = 300.0  # longest a trainer may take to get ready or to run its epochs


def busy(args: argparse.Namespace) -> list[Row]:
    """Run scenarios a, b and c (see the module docstring).

    Parameters
    ----------
    args : argparse.Namespace
        Options (``busy_items``, ``busy_trainers``, ``busy_epochs``, ``rounds``).

    Returns
    -------
    list of Row
        One row per variant and scenario.
    """
    provider = Provider(args.busy_items, SHAPE)
    ds = preloaded(provider, args, "busy")
    try:
        rows = one_core_busy(ds, provider, args)
        for omp_one in (False, True):
            rows += concurrent(ds.cache.name, args, omp_one)
    finally:
        close_cache(ds)
    return rows


def spinner() -> subprocess.Popen:
    """Start a process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def one_core_busy(ds: object, provider: Provider, args: argparse.Namespace) -> list[Row]:
    """Scenario a: warm epochs in this process while another process spins on one core."""
    n = len(provider)
    scenario = f"busy node (a): one other process busy on one core, 48 KiB items, n={n:,}"
    log("== %s", scenario)
    items = [provider[i] for i in range(n)]
    limit = GatherDataset(
        np.stack([it["image"] for it in items]), np.array([it["label"] for it in items])
    )
    variants: dict[str, Callable[[], float]] = {
        "numpy gather (limit)": lambda: timed_epoch(make_loader(limit, identity)),
        MODES["dict"]: lambda: timed_epoch(make_loader(ListDataset(items))),
        MODES["collate"]: lambda: timed_epoch(make_loader(ds, ds.collate)),
        MODES["stock"]: lambda: timed_epoch(make_loader(ds)),
    }
    for fn in variants.values():
        fn()
    spin = spinner()
    try:
        samples = run_rounds(variants, args.rounds)
    finally:
        spin.kill()
        spin.wait(timeout=30)
    notes = {name: "one other process spinning on one core" for name in variants}
    return compare(scenario, samples, "items/s", _checks(samples), notes)


def concurrent(cache_name: str, args: argparse.Namespace, omp_one: bool) -> list[Row]:
    """Scenarios b and c: K trainer processes per way of reading, read at the same time."""
    k, n = args.busy_trainers, args.busy_items
    threads = "OMP_NUM_THREADS=1" if omp_one else "torch's default threads"
    scenario = (
        f"busy node ({'c' if omp_one else 'b'}): {k} trainers at once, {threads}, "
        f"48 KiB items, n={n:,}"
    )
    log("== %s", scenario)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    if omp_one:
        env["OMP_NUM_THREADS"] = "1"
    groups = {mode: _start(mode, k, n, args.busy_epochs, cache_name, env) for mode in MODES}
    try:
        for group in groups.values():
            for proc, log_file in group:
                _expect(proc, log_file, "READY")
        variants = {MODES[mode]: (lambda g=group: _aggregate(g)) for mode, group in groups.items()}
        samples = run_rounds(variants, args.rounds)
    finally:
        for group in groups.values():
            _stop(group)
    note = f"aggregate of {k} processes, {args.busy_epochs} epochs each, {threads}"
    return compare(scenario, samples, "items/s", _checks(samples), dict.fromkeys(samples, note))


def _checks(samples: dict) -> dict:
    """Return ``CHECKS`` less the baselines a scenario did not run."""
    return {v: {b: t for b, t in c.items() if b in samples} for v, c in CHECKS.items()}


def _start(mode: str, k: int, n: int, epochs: int, cache_name: str, env: dict) -> list:
    """Start ``k`` trainers of one way of reading; return ``(process, log file)`` pairs."""
    group = []
    for _ in range(k):
        log_file = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.busy_trainer",
                mode,
                str(n),
                str(epochs),
                cache_name,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
        )
        group.append((proc, log_file))
    return group


def _expect(proc: subprocess.Popen, log_file: object, marker: str) -> str:
    """Return the rest of the trainer's next stdout line that starts with ``marker``."""
    deadline = time.monotonic() + WAIT_S
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:  # the trainer exited
                break
            if line.startswith(marker):
                return line[len(marker) :].strip()
    log_file.seek(0)
    tail = log_file.read()[-2000:]
    raise RuntimeError(f"busy trainer (pid {proc.pid}) gave no {marker} line; its log:\n{tail}")


def _aggregate(group: list) -> float:
    """Have every trainer of a group run its epochs at once; return total items/s."""
    for proc, _ in group:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [json.loads(_expect(proc, log_file, "RESULT")) for proc, log_file in group]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    copies = [r["copies"] for r in results]
    if any(c["pool"] or c["one_thread"] for c in copies):
        log("   batch copies timed per trainer (pool / one thread): %s", copies)
    return sum(r["items"] for r in results) / span


def _stop(group: list) -> None:
    """Close the trainers' stdin (they exit) and wait for them; kill any that hangs."""
    for proc, _ in group:
        try:
            proc.stdin.close()
        except OSError:
            pass
    for proc, log_file in group:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log_file.close()
