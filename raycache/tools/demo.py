"""``raycache demo``: K trainers on one node, one cache, measured against no cache.

The demo is the README's first command, so it needs nothing but this package: it
writes a synthetic astronomy-like dataset (cutouts in ``.npy`` shards, read back with
a simulated per-file latency), starts an embedded local Ray, runs K trainer processes
(a gloo process group, as torchrun would start it) that share one preloaded cache,
prints a table per epoch, and then trains again reading the files every epoch. It
stops every process it started and frees the cache before it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["main", "parse_args"]

MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the demo's options.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        The options.
    """
    p = argparse.ArgumentParser(
        prog="raycache demo",
        description="Train a small CNN with K trainer processes sharing one raycache "
        "cache, then without the cache, and print a table per epoch.",
    )
    p.add_argument("--items", type=int, default=4096, help="cutouts (default %(default)s)")
    p.add_argument("--shape", default="3x64x64", help="cutout shape CxHxW (%(default)s)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=4.0,
        help="simulated latency of each file read, ms (%(default)s)",
    )
    p.add_argument("--trainers", type=int, default=2, help="trainer processes (%(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (%(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="per trainer (%(default)s)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="where the shards go; kept afterwards (default: a temporary directory)",
    )
    p.add_argument("--no-compare", action="store_true", help="skip the run without cache")
    p.add_argument("--no-verify", action="store_true", help="skip checking item values")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before giving up (%(default)s)"
    )
    p.add_argument("--json", default=None, help="also write every rank's records here")
    args = p.parse_args(argv)
    from raycache.tools.train.data import parse_shape

    try:
        args.shape = parse_shape(args.shape)
    except ValueError as exc:
        p.error(str(exc))
    for key in ("items", "trainers", "epochs", "batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.latency_ms < 0:
        p.error("--latency-ms must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every trainer received its whole shard with the right values; 1 if a
        check failed, a trainer failed or the demo timed out (the ``raycache`` exit
        statuses: 2 is kept for bad options, which ``parse_args`` reports).
    """
    args = parse_args(argv)
    deadline = time.monotonic() + args.timeout
    with _data_dir(args.data_dir) as data_dir:
        from raycache.tools.train.data import write_cutouts

        item_bytes = 4 * args.shape[0] * args.shape[1] * args.shape[2]
        data_bytes = args.items * item_bytes
        start = time.perf_counter()
        write_cutouts(data_dir, args.items, args.shape)
        print(
            f"dataset: {args.items} cutouts of {'x'.join(map(str, args.shape))} float32 "
            f"({data_bytes / MB:.0f} MB) in {data_dir} ({time.perf_counter() - start:.1f} s); "
            f"every read waits {args.latency_ms:g} ms",
            flush=True,
        )
        try:
            runs = [("with raycache (shared cache, preload)", False)]
            if not args.no_compare:
                runs.append(("without cache (every epoch reads the files)", True))
            results = []
            for title, no_cache in runs:
                results.append(_run(args, data_dir, data_bytes, title, no_cache, deadline))
        except _Failed as exc:
            print(f"raycache demo: {exc}", file=sys.stderr)
            return 1
    _summary(results, data_bytes, time.monotonic() - deadline + args.timeout)
    if args.json:
        Path(args.json).write_text(json.dumps({"data_bytes": data_bytes, "runs": results}))
    ok = all(r["ok"] for r in results)
    if not ok:
        print("CHECK FAILED: some trainer did not receive its shard with the right values")
    return 0 if ok else 1


class _Failed(RuntimeError):
    """A trainer failed or the demo ran out of time."""


@contextlib.contextmanager
def _data_dir(path: str | None) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    tmp = tempfile.mkdtemp(prefix="raycache-demo-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    data_dir: Path,
    data_bytes: int,
    title: str,
    no_cache: bool,
    deadline: float,
) -> dict:
    """Run one training (K trainers, all epochs), printing its table as it goes."""
    print(f"\n== {args.trainers} trainers, {title}", flush=True)
    name = f"raycache-demo-{os.getpid()}"
    address = None if no_cache else _start_ray(data_bytes)
    try:
        with tempfile.TemporaryDirectory(prefix="raycache-demo-run-") as result_dir:
            cmd = _trainer_command(args, data_dir, name, result_dir, address)
            events = _launch(cmd, args.trainers, Path(result_dir), deadline)
            rows = _table(events, data_bytes)
            ranks = [
                json.loads((Path(result_dir) / f"rank-{r}.json").read_text())
                for r in range(args.trainers)
            ]
    finally:
        if address is not None:
            _stop_ray(name, address)
    ok = all(
        e["shard"]["order_errors"] == 0
        and e["shard"]["bad_values"] == 0
        and e["shard"]["seen"] == e["shard"]["expected"]
        for rank in ranks
        for e in rank["epochs"]
    )
    return {"title": title, "rows": rows, "ok": ok, "no_cache": no_cache, "ranks": ranks}


def _start_ray(data_bytes: int) -> str:
    """Start a local Ray of the demo's own; return its address."""
    import ray

    start = time.perf_counter()
    # A local Ray of our own ("local"): never attach to another Ray on this machine.
    ray.init(
        address="local",
        include_dashboard=False,
        object_store_memory=max(512 * MB, 3 * data_bytes),
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    address = ray.get_runtime_context().gcs_address
    print(f"started a local Ray at {address} ({time.perf_counter() - start:.1f} s)", flush=True)
    return address


def _stop_ray(name: str, address: str) -> None:
    """Free the demo's cache and stop its Ray; a cache that cannot be freed is reported."""
    import ray

    from raycache.admin import drop_cache

    try:
        drop_cache(name, address=address)
    except Exception as exc:  # Ray stops below anyway, and with it the cache
        print(f"could not free cache {name!r} before stopping Ray: {exc}", file=sys.stderr)
    ray.shutdown()


def _trainer_command(
    args: argparse.Namespace, data_dir: Path, name: str, result_dir: str, address: str | None
) -> list[str]:
    """Return the command line of one trainer rank (``address`` None: no cache)."""
    cmd = [
        sys.executable,
        "-m",
        "raycache.tools.train.worker",
        "--data-dir",
        str(data_dir),
        "--latency-ms",
        str(args.latency_ms),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--name",
        name,
        "--result-dir",
        result_dir,
    ]
    # Reads wait on latency, not CPU: more of them in flight fill the cache sooner.
    cmd += ["--no-cache"] if address is None else ["--address", address, "--preload-threads", "16"]
    cmd += ["--no-verify"] if args.no_verify else []
    cmd += ["--record-indices"] if args.json else []
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], k: int, result_dir: Path, deadline: float) -> Iterator[dict]:
    """Start K ranks with torchrun's environment; yield rank 0's events as they come."""
    procs: list[subprocess.Popen] = []
    logs: list = []
    try:
        _start_ranks(cmd, k, result_dir, procs, logs)
        yield from _follow(procs, result_dir, deadline)
        for p in procs:
            left = max(1.0, deadline - time.monotonic())
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired as exc:
                raise _Failed("timed out waiting for trainers to exit") from exc
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise _Failed(_failure(failed, procs, result_dir))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()


def _start_ranks(
    cmd: list[str], k: int, result_dir: Path, procs: list[subprocess.Popen], logs: list
) -> None:
    """Start the K ranks, appending each to ``procs`` and its log file to ``logs``.

    The caller's lists are filled as processes start, so that the caller stops every
    one of them even if a later start fails.
    """
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(k),
        LOCAL_WORLD_SIZE=str(k),
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // k)),
        PYTHONUNBUFFERED="1",
    )
    for rank in range(k):
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0")
        log = open(result_dir / f"rank-{rank}.log", "w")  # noqa: SIM115 - the caller closes it
        logs.append(log)
        procs.append(
            subprocess.Popen(
                cmd,
                env=dict(env),
                stdout=subprocess.PIPE if rank == 0 else log,
                stderr=log,
                text=True,
            )
        )


def _follow(procs: list[subprocess.Popen], result_dir: Path, deadline: float) -> Iterator[dict]:
    """Yield rank 0's events until its output ends; fail on a rank's error or the deadline."""
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_pump, args=(procs[0].stdout, lines), daemon=True)
    reader.start()
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None:  # rank 0's stdout closed: it has exited
            return
        if line.startswith("RAYCACHE "):
            yield json.loads(line[len("RAYCACHE ") :])
        elif line:
            print(line, end="", flush=True)
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            raise _Failed(_failure(failed, procs, result_dir))
        if time.monotonic() > deadline:
            raise _Failed("timed out; trainers stopped")


def _pump(stream: object, lines: queue.Queue) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(None)


def _failure(failed: list[int], procs: list, result_dir: Path) -> str:
    parts = []
    for r in failed:
        tail = (result_dir / f"rank-{r}.log").read_text().splitlines()[-20:]
        parts.append(f"trainer rank {r} exited with {procs[r].returncode}:\n" + "\n".join(tail))
    return "\n".join(parts)


_HEADER = (
    f"{'epoch':>5}  {'wall s':>7}  {'items/s':>8}  {'hit ratio':>9}  {'cache MB':>8}  "
    f"{'store MB':>14}  {'node MB':>8}"
)


def _table(events: Iterator[dict], data_bytes: int) -> list[dict]:
    """Print the per-epoch table from the trainers' events; return the epoch rows."""
    baseline = None
    rows = []
    for event in events:
        if event["kind"] == "baseline":
            baseline = event.get("memory")
            print(_HEADER, flush=True)
        elif event["kind"] == "epoch":
            event["baseline"] = baseline
            rows.append(event)
            print(_row(event, data_bytes), flush=True)
        elif event["kind"] == "done":
            stats = event["stats"]
            preload = stats.get("preload", {})
            print(
                f"cache: {stats['items']} items, {stats['bytes'] / MB:.0f} MB in "
                f"{stats['chunks']} chunks; one preload for all trainers, overlapping epoch 1 "
                f"({preload.get('loaded', 0)} items in {preload.get('seconds', 0):.1f} s, "
                "the rest read by the trainers on a miss)",
                flush=True,
            )
    return rows


def _row(event: dict, data_bytes: int) -> str:
    memory = event.get("memory") or {}
    hit = "-" if event["hit_ratio"] is None else f"{event['hit_ratio']:.2f}"
    store = node = "-"
    if memory:
        store = f"{memory['shmem'] / MB:.0f} ({memory['shmem'] / data_bytes:.2f}x)"
        node = f"{memory['total'] / MB:.0f}"
    return (
        f"{event['epoch']:>5}  {event['seconds']:>7.2f}  {event['items_per_s']:>8.0f}  "
        f"{hit:>9}  {event['cache_bytes'] / MB:>8.0f}  {store:>14}  {node:>8}"
    )


def _summary(results: list[dict], data_bytes: int, seconds: float) -> None:
    print(
        "\nwall s: the slowest trainer's epoch (value checks excluded); items/s: all trainers "
        "together;\nstore MB: shared memory resident on the node (Ray's object store), each "
        "page counted once,\n  and as a multiple of the data size "
        f"({data_bytes / MB:.0f} MB); node MB: PSS summed over Ray's processes and the trainers."
    )
    for result in results:
        base = (result["rows"][0].get("baseline") if result["rows"] else None) or {}
        last = (result["rows"][-1].get("memory") if result["rows"] else None) or {}
        if base and last:
            print(
                f"{result['title']}: node {last['total'] / MB:.0f} MB at the end: Ray's "
                f"processes {last['ray'] / MB:.0f} MB, trainers {last['trainers'] / MB:.0f} MB "
                f"(at the start {base['ray'] / MB:.0f} and {base['trainers'] / MB:.0f} MB)."
            )
    cached = next((r for r in results if not r["no_cache"]), None)
    plain = next((r for r in results if r["no_cache"]), None)
    if cached and plain and len(cached["rows"]) > 1 and len(plain["rows"]) > 1:
        warm_c = min(r["seconds"] for r in cached["rows"][1:])
        warm_p = min(r["seconds"] for r in plain["rows"][1:])
        print(
            f"warm epochs: {warm_c:.2f} s with raycache, {warm_p:.2f} s without "
            f"({warm_p / max(warm_c, 1e-9):.1f}x faster)."
        )
    print(f"demo finished in {seconds:.0f} s; Ray stopped, cache freed.")
