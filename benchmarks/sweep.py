"""A sweep of training jobs over one dataset: raycache detached vs a dict cache per job.

A hyperparameter sweep runs the same data through several jobs, one after the other, each
a new driver process. The cache that outlives a job (``raycache.detached = true``) should
let only the first job read the provider; a cache inside each job (Hyrax's dict cache)
reads everything again in every job; no cache reads every item in every epoch.

sweep
    ``--sweep-jobs`` jobs (default 4), each ``python -m benchmarks.sweep`` in a new
    process: attach, ``--sweep-epochs`` shuffled epochs (default 2, batch 64,
    ``num_workers=0``) over a provider that sleeps 2 ms per item (I/O latency). Variants:
    raycache with a detached cache and preload, a dict cache per job filled by a thread
    pool of the same concurrency (``benchmarks.baselines.ThreadPoolCache``), and the
    provider alone. Reported: the sweep's wall time (process start-up included, the same
    for every variant) and the provider reads of all jobs, wherever they ran (a job's own
    process, its threads or Ray's preload tasks): each read appends a byte to a file of
    its process in a folder the sweep reads at the end.

The detached cache is dropped when the sweep ends, also when a job failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

import raycache
from benchmarks.baselines import ThreadPoolCache
from benchmarks.common import cache_config, log, make_loader, unique_name
from benchmarks.providers import Provider
from benchmarks.results import Row, compare

__all__ = ["VARIANTS", "CountingProvider", "run_job", "sweep"]

VARIANTS = ("raycache detached", "dict cache per job", "no cache")
LATENCY_S = 0.002
SHAPE = (3, 64, 64)
JOB_TIMEOUT_S = 300.0


class CountingProvider(Provider):
    """``Provider`` that records each read as one byte in a file of the reading process.

    The counter folder does not change the items, so the provider states its identity
    (``cache_identity``): jobs that count into different folders share one cache.

    Parameters
    ----------
    n : int
        Number of items.
    reads_dir : str
        Folder for the per-process counter files.
    """

    def __init__(self, n: int, reads_dir: str):
        super().__init__(n, SHAPE, latency_s=LATENCY_S)
        self.reads_dir = reads_dir

    def cache_identity(self) -> tuple:
        """Return what determines the items: length, shape and latency, not the folder."""
        return (self.n, self.shape, self.latency_s)

    def __getitem__(self, idx: int) -> dict:
        item = super().__getitem__(idx)
        # One O_APPEND write per read: atomic between threads, no state to pickle into
        # Ray's preload tasks, and ~20 us against the 2 ms the read takes.
        with open(os.path.join(self.reads_dir, f"reads-{os.getpid()}"), "ab") as f:
            f.write(b".")
        return item


def count_reads(reads_dir: str) -> int:
    """Return the reads recorded in ``reads_dir`` by every process."""
    return sum(p.stat().st_size for p in Path(reads_dir).glob("reads-*"))


def _epochs(dataset: Any, collate: Any, epochs: int) -> list[float]:
    loader = make_loader(dataset, collate)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in loader:
            pass
        seconds.append(time.perf_counter() - start)
    return seconds


def run_job(args: argparse.Namespace) -> dict:
    """Run one job of the sweep in this process: attach, ``args.epochs`` epochs.

    Parameters
    ----------
    args : argparse.Namespace
        ``variant``, ``items``, ``epochs``, ``threads``, ``reads_dir``, and for raycache
        ``name`` and ``address``.

    Returns
    -------
    dict
        ``epoch_seconds``: each epoch's time.
    """
    provider = CountingProvider(args.items, args.reads_dir)
    if args.variant == "no cache":
        return {"epoch_seconds": _epochs(provider, None, args.epochs)}
    if args.variant == "dict cache per job":
        cache = ThreadPoolCache(provider, args.threads)
        cache.start()
        try:
            return {"epoch_seconds": _epochs(cache, None, args.epochs)}
        finally:
            cache.stop()
    from raycache.dataset import CachedDataset

    options = argparse.Namespace(threads=args.threads, chunk_size=None)
    config = cache_config(args.name, options, True, detached=True, address=args.address)
    ds = CachedDataset(provider, config)
    try:
        return {"epoch_seconds": _epochs(ds, ds.collate, args.epochs)}
    finally:
        ds.cache.close()


def _job_command(variant: str, args: argparse.Namespace, reads_dir: str, name: str) -> list:
    address = ray.get_runtime_context().gcs_address
    return [
        sys.executable,
        "-m",
        "benchmarks.sweep",
        "--variant",
        variant,
        "--items",
        str(args.sweep_items),
        "--epochs",
        str(args.sweep_epochs),
        "--threads",
        str(args.threads),
        "--reads-dir",
        reads_dir,
        "--name",
        name,
        "--address",
        address,
    ]


def _run_variant(variant: str, args: argparse.Namespace) -> tuple[float, list[int]]:
    """Run the sweep's jobs one after the other; return (wall seconds, reads per job)."""
    name = unique_name("sweep")
    with tempfile.TemporaryDirectory(prefix="raycache-sweep-") as reads_dir:
        command = _job_command(variant, args, reads_dir, name)
        start = time.perf_counter()
        reads: list[int] = []
        try:
            for job in range(args.sweep_jobs):
                job_start = time.perf_counter()
                proc = subprocess.run(
                    command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
                )
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"sweep job {job} ({variant}) exited {proc.returncode}: "
                        f"{proc.stderr.strip()[-2000:]}"
                    )
                epochs = json.loads(proc.stdout.strip().splitlines()[-1])["epoch_seconds"]
                # Every process of the job has ended (a detached cache's preload is over by
                # the end of epoch 1), so its reads are all counted by now.
                reads.append(count_reads(reads_dir) - sum(reads))
                log(
                    "  %-20s job %d: %.1f s in all, epochs %s s, %d provider reads",
                    variant,
                    job,
                    time.perf_counter() - job_start,
                    [round(s, 2) for s in epochs],
                    reads[-1],
                )
            seconds = time.perf_counter() - start
        finally:
            if variant == "raycache detached":
                raycache.drop_cache(name)
        return seconds, reads


def sweep(args: argparse.Namespace) -> list[Row]:
    """Measure the sweep row for every variant, once each (see the module docstring).

    Parameters
    ----------
    args : argparse.Namespace
        Options: ``sweep_jobs``, ``sweep_epochs``, ``sweep_items``, ``threads``.

    Returns
    -------
    list of Row
        Wall time (s) and provider reads of each variant, compared with the others.
    """
    scenario = (
        f"sweep, {args.sweep_jobs} jobs x {args.sweep_epochs} epochs, "
        f"{args.sweep_items:,} items, {LATENCY_S * 1000:g} ms per item"
    )
    log("%s", scenario)
    walls, reads, notes = {}, {}, {}
    for variant in VARIANTS:
        seconds, per_job = _run_variant(variant, args)
        walls[variant], reads[variant] = [seconds], [float(sum(per_job))]
        notes[variant] = "provider reads per job: " + ", ".join(str(n) for n in per_job)
        log("  %-20s %.1f s, %d provider reads", variant, seconds, sum(per_job))
    mine = VARIANTS[0]
    checks = {mine: {other: None for other in VARIANTS[1:]}}
    return compare(scenario, walls, "s", checks, notes) + compare(
        scenario + " (provider reads)", reads, "reads", checks, notes
    )


def _parse_job(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="One job of the sweep benchmark.")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--reads-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--address", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run_job(_parse_job(None))), flush=True)
