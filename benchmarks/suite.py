"""The benchmark suite's entry point: options, the scenarios in order, Ray, the report.

A speed claim only means something next to the alternative measured on the same machine
at the same time, so ``raycache bench`` starts one local Ray, runs every scenario and its
baselines in this process tree, and reports each result as a ratio to its baseline.
The machine is often shared and noisy: warm epochs are repeated in rounds whose order
rotates, and the median is reported. It writes ``benchmarks.md`` (workload, caveats, then
the table) and ``benchmarks.png`` into ``--out`` (default ``./raycache-bench-results``).

Scenarios
---------
warm
    A shuffled epoch, batch 64, ``num_workers=0``, of a fully cached dataset, for 48 KiB
    and 1 KiB items, against the numpy fancy-index gather limit, a plain in-process dict
    cache (what Hyrax keeps) and Ray Data (``benchmarks.warm``).
busy
    Warm epochs on a busy node: one other process busy on one core, and K trainer
    processes at once with torch's default threads and with ``OMP_NUM_THREADS=1``,
    against the dict cache in the same conditions (``benchmarks.busy``).
preload
    The first epoch while the cache preloads, I/O-bound and CPU-bound, against a
    thread-pool preloader of the same concurrency (Hyrax's) and no cache
    (``benchmarks.first_epoch``).
alone
    The preload alone (no trainer), I/O- and CPU-bound, 1 KiB to 1 MiB items, 8 to 64
    reads in flight, against a thread pool and the ideal ``items x latency / threads``
    (``benchmarks.preload_alone``; run it alone for the default, not preallocated, store).
fill
    The first epoch without preload (each miss read by the trainer and inserted) against
    the same epoch with no cache: the cost of caching (``benchmarks.first_epoch``).
scale
    A cache of a million items: how long a new process takes to be ready to read, and the
    directory actor's memory for the map (``benchmarks.scale``).
sweep
    Successive training jobs, each a new process, over one I/O-bound dataset: raycache with
    a detached cache against a dict cache per job and no cache; wall time and provider
    reads of the whole sweep (``benchmarks.sweep``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from benchmarks.busy import busy
from benchmarks.common import export_source_tree, log
from benchmarks.first_epoch import fill, preload, startup
from benchmarks.preload_alone import add_arguments as add_alone_arguments
from benchmarks.preload_alone import preload_alone
from benchmarks.providers import MIB, Provider, calibrate_spin
from benchmarks.report import markdown_table, write_report
from benchmarks.results import Row
from benchmarks.scale import scale
from benchmarks.sweep import sweep
from benchmarks.warm import warm

__all__ = ["DEFAULT_OUT", "SCENARIOS", "export_source_tree", "main", "parse_args", "run_scenarios"]

DEFAULT_OUT = "raycache-bench-results"
SCENARIOS = ("warm", "busy", "preload", "alone", "fill", "scale", "sweep")


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
    if "busy" in only:
        rows += busy(args)
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
    if "alone" in only:
        rows += preload_alone(args)
    if "fill" in only:
        rows += fill(args, "io", Provider(args.fill_items, shape, latency_s=0.002))
        rows += fill(args, "cpu", Provider(args.fill_items, shape, spin_iterations=iterations))
        rows += fill(args, "memory", Provider(args.warm_large_items, shape))
    if "scale" in only:
        scale_rows, info["scale"] = scale(args)
        rows += scale_rows
    if "sweep" in only:
        rows += sweep(args)
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
        description="Run raycache's benchmark suite and write benchmarks.md and benchmarks.png "
        "into --out.",
    )
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--warm-large-items", type=int, default=20_000, help="48 KiB items")
    p.add_argument("--warm-small-items", type=int, default=200_000, help="1 KiB items")
    p.add_argument("--busy-items", type=int, default=20_000, help="48 KiB items, busy node")
    p.add_argument("--busy-trainers", type=int, default=2, help="trainers at once, busy node")
    p.add_argument("--busy-epochs", type=int, default=2, help="epochs per trainer and round")
    p.add_argument("--preload-items", type=int, default=4096)
    p.add_argument("--fill-items", type=int, default=2048)
    p.add_argument("--scale-items", type=int, default=1_000_000)
    p.add_argument("--sweep-jobs", type=int, default=4, help="jobs (processes) in the sweep")
    p.add_argument("--sweep-epochs", type=int, default=2, help="epochs per sweep job")
    p.add_argument("--sweep-items", type=int, default=1024, help="items of the sweep's dataset")
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
        help="do not write the object store once before the scenarios: their first writes "
        "fault its pages in",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help="folder for benchmarks.md and benchmarks.png (default: ./%(default)s; "
        "--out docs rewrites the repository's page)",
    )
    p.add_argument("--no-report", action="store_true", help="print the table only")
    add_alone_arguments(p)
    return p.parse_args(argv)


def write_store_once(store_mb: int) -> float:
    """Write (nearly) every page of the object store once, untimed; return the seconds.

    A page of the store costs most the first time it is written: ~2.5-6 ms per MB here,
    against ~0.3 ms once it is resident. The store's allocator puts each round's chunks
    wherever it likes, so without this some rounds of a first-epoch scenario pay that and
    some do not. Ray's own ``preallocate_plasma_memory`` does the same inside the raylet
    before it registers, and Ray gives the raylet 30 s to register: on a VM whose host
    backs each new page lazily, 4 GiB took longer and Ray's start failed.

    Parameters
    ----------
    store_mb : int
        The store's size in MiB (9/10 of it is written, so nothing spills).

    Returns
    -------
    float
        Seconds it took.
    """
    start = time.perf_counter()
    block = np.zeros(256 * MIB, dtype=np.uint8)  # zero pages: reading it faults nothing in
    refs = [ray.put(block) for _ in range(store_mb * 9 // 10 // 256)]
    del refs  # freed; the store keeps the pages resident and reuses them
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite (``raycache bench``).

    Starts a private local Ray instance (never attaches to one that is running, whose
    other work would disturb the timings), runs the scenarios, shuts Ray down and writes
    the report into ``--out``.

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
    export_source_tree()
    start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        object_store_memory=args.object_store_mb * MIB,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    ray_up_s = time.perf_counter() - start
    try:
        store_s = None if args.no_preallocate_store else write_store_once(args.object_store_mb)
        if store_s is not None:
            log("store written once in %.1f s", store_s)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        log("ray up after %.1f s", ray_up_s)
        rows, info = run_scenarios(args)
        info["ray_up_s"] = ray_up_s
        info["store_written_s"] = store_s
    finally:
        ray.shutdown()
    info["wall_s"] = time.perf_counter() - start
    info["argv"] = list(sys.argv[1:] if argv is None else argv)
    table = markdown_table(rows)
    print(table)
    if not args.no_report:
        write_report(args, rows, info, table)
    log("total wall time %.0f s", info["wall_s"])
    return 0
