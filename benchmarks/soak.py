"""A bounded soak: trainers attach, read and detach while faults are injected at random.

For ``--seconds``, ``--trainers`` processes each attach to one cache, read an epoch
(every item compared with the provider), detach, and start again; one of them asks for a
preload each time. Meanwhile the soak injects a fault every ``--fault-every`` seconds
(on average), one of: a trainer SIGKILLed (and started again), the directory actor
SIGKILLed, the cache dropped (``raycache.drop_cache``). When the time is up the trainers
finish their epoch and exit, this process reads one more epoch and checks it, drops the
cache, and prints what happened::

    python -m benchmarks.soak --seconds 60

    soak: 60 s, 3 trainers, 2,000 items
    epochs 41, items read 82,000, faults injected 17 (trainer 6, actor 6, drop 5)
    errors seen 0, wrong items 0
    leaked: actors 0, objects 0, processes 0

It exits 1 if an item was wrong, a trainer raised, or anything leaked. A wrong item is one
whose value, dtype or shape differs from the provider's; an error is any exception a
trainer's epoch raised (a fault must cost reads from the provider, never an error).

It starts a Ray of its own (2 CPUs, no dashboard) and stops it at the end. Not a unit
test: it runs for a set time and prints figures for ``docs/troubleshooting.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SoakItems", "check_epoch", "main"]

ROOT = Path(__file__).resolve().parent.parent
NAME = "soak"
WAIT_S = 60.0  # longest a trainer may take to finish its epoch once the time is up


class SoakItems:
    """A map-style dataset of items that depend only on their index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {
            "image": np.full((4, 16, 16), i, dtype=np.float32),
            "meta": {"index": int(i), "id": f"obj-{i}"},
        }


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and set(got) == set(want)
            and all(_same(got[k], want[k]) for k in want)
        )
    if isinstance(want, np.ndarray):
        got = got.numpy() if hasattr(got, "numpy") else got
        return (
            isinstance(got, np.ndarray)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and np.array_equal(got, want)
        )
    return type(got) is type(want) and got == want


def check_epoch(ds: Any, provider: SoakItems, rng: random.Random, batch: int = 64) -> int:
    """Read every index of ``ds`` once, shuffled; return how many items were wrong.

    Parameters
    ----------
    ds : CachedDataset
        The dataset.
    provider : SoakItems
        What each item must equal.
    rng : random.Random
        The shuffle.
    batch : int
        Indices per ``__getitems__`` call.

    Returns
    -------
    int
        Items whose value, dtype or shape differs from the provider's.
    """
    order = list(range(len(provider)))
    rng.shuffle(order)
    wrong = 0
    for start in range(0, len(order), batch):
        indices = order[start : start + batch]
        for idx, item in zip(indices, ds.__getitems__(indices)):
            wrong += not _same(item, provider[idx])
    return wrong


def _config(preload: bool) -> dict:
    return {
        "data_set": {"preload_cache": preload, "preload_threads": 2},
        "raycache": {"name": NAME, "chunk_size": 128, "linger_s": 5.0, "timeout_s": 30.0},
    }


def trainer(address: str, items: int, until: float, preload: bool, seed: int) -> None:
    """Attach, read an epoch, detach, until ``until``; print one JSON line per epoch.

    Parameters
    ----------
    address : str
        The Ray address.
    items : int
        Provider length.
    until : float
        ``time.time()`` after which no epoch starts.
    preload : bool
        Ask for a preload at each attach.
    seed : int
        The shuffle's seed.
    """
    import ray

    from raycache import CachedDataset

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    provider, rng = SoakItems(items), random.Random(seed)
    while time.time() < until:
        report = {"epochs": 0, "items": 0, "wrong": 0, "errors": []}
        try:
            ds = CachedDataset(provider, _config(preload))
            try:
                report["wrong"] = check_epoch(ds, provider, rng)
                report["epochs"], report["items"] = 1, items
            finally:
                ds.cache.close()
        except Exception as exc:  # counted and shown by the soak: a fault must not raise
            report["errors"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        print(json.dumps(report), flush=True)
    ray.shutdown()


class Trainers:
    """The trainer processes, started again when killed, and what they report."""

    def __init__(self, address: str, items: int, until: float, count: int, preload: bool):
        self.address, self.items, self.until = address, items, until
        self.preload = preload  # the first trainer asks for a preload at each attach
        self.procs: dict[int, subprocess.Popen] = {}
        self.totals = {"epochs": 0, "items": 0, "wrong": 0, "errors": []}
        self._started = 0
        for slot in range(count):
            self.start(slot)

    def start(self, slot: int) -> None:
        self._started += 1
        args = [sys.executable, "-m", "benchmarks.soak", "--trainer", self.address]
        args += ["--items", str(self.items), "--until", str(self.until)]
        args += ["--seed", str(self._started)]
        args += ["--preload"] if slot == 0 and self.preload else []
        log = open(os.devnull, "w")  # noqa: SIM115 - the child's stderr; closed with it
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs[slot] = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        log.close()

    def kill_one(self, rng: random.Random) -> None:
        slot = rng.choice(sorted(self.procs))
        proc = self.procs[slot]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        self._collect(proc, timeout=WAIT_S)
        if time.time() < self.until:
            self.start(slot)

    def finish(self) -> int:
        """Wait for every trainer to end (killing any still running after WAIT_S)."""
        left = 0
        for proc in self.procs.values():
            self._collect(proc, timeout=max(1.0, self.until + WAIT_S - time.time()))
            left += proc.poll() is None
        return left

    def _collect(self, proc: subprocess.Popen, timeout: float) -> None:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=30)
            self.totals["errors"].append(f"trainer {proc.pid} did not end in time")
        for line in out.splitlines():
            if line.startswith("{"):
                report = json.loads(line)
                for key in ("epochs", "items", "wrong"):
                    self.totals[key] += report[key]
                self.totals["errors"] += report["errors"]


def _kill_actor() -> bool:
    import ray

    from raycache.directory import directory_actor

    try:
        actor = directory_actor(NAME, "raycache")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    except Exception:  # no cache right now (dropped, or being recreated): nothing to kill
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def _inject(trainers: Trainers, rng: random.Random, faults: dict) -> None:
    import raycache

    kind = rng.choice(["trainer", "actor", "drop"])
    if kind == "trainer":
        trainers.kill_one(rng)
    elif kind == "actor":
        if not _kill_actor():
            return
    elif not raycache.drop_cache(NAME):
        return
    faults[kind] += 1


def _objects(address: str) -> int:
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=address, stats_only=True)
    for line in summary.splitlines():
        if line.startswith("Plasma memory usage"):
            return int(line.split(",")[1].split()[0])
    return -1


def _leaks(address: str, children: set[int]) -> dict:
    import psutil
    import ray

    deadline = time.monotonic() + 30  # the killed actor's objects are freed by Ray, later
    while True:
        actors = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if "raycache:" in a["name"]
        ]
        objects = _objects(address)
        if (not actors and objects == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    alive = [
        pid
        for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    return {"actors": len(actors), "objects": objects, "processes": len(alive)}


def soak(
    seconds: float, count: int, items: int, fault_every: float, seed: int, preload: bool = True
) -> int:
    """Run the soak; print its figures; return the exit status (0: all good).

    Parameters
    ----------
    seconds : float
        How long trainers start epochs.
    count : int
        Trainer processes.
    items : int
        Provider length.
    fault_every : float
        Mean seconds between faults.
    seed : int
        Seed of the fault schedule.
    preload : bool
        The first trainer asks for a preload at each attach.
    """
    import ray

    import raycache
    from raycache import CachedDataset

    ray.init(
        address="local",  # a Ray of its own, never one found on the machine
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    address = ray.get_runtime_context().gcs_address
    rng = random.Random(seed)
    until = time.time() + seconds
    trainers = Trainers(address, items, until, count, preload)
    faults = {"trainer": 0, "actor": 0, "drop": 0}
    while time.time() < until:
        time.sleep(min(rng.expovariate(1.0 / fault_every), max(0.0, until - time.time())))
        if time.time() < until:
            _inject(trainers, rng, faults)
    stuck = trainers.finish()
    children = {p.pid for p in trainers.procs.values()}
    provider = SoakItems(items)
    ds = CachedDataset(provider, _config(False))
    wrong = check_epoch(ds, provider, rng)  # the cache as the faults left it
    wrong += check_epoch(ds, provider, rng)
    ds.cache.close()
    raycache.drop_cache(NAME)
    # A closed client's mapped chunks are freed with it, by the cycle collector.
    before_gc = _objects(address)
    gc.collect()
    leaks = _leaks(address, children)
    ray.shutdown()
    return _report(
        {"seconds": seconds, "trainers": count, "items": items, "checked": 2},
        trainers.totals,
        faults,
        {"wrong": wrong, "stuck": stuck, "before_gc": before_gc, **leaks},
    )


def _report(run: dict, totals: dict, faults: dict, end: dict) -> int:
    """Print the soak's figures; return its exit status (0: nothing wrong, stuck or leaked)."""
    items, checked = run["items"], run["checked"]
    wrong = end["wrong"] + totals["wrong"]
    print(f"soak: {run['seconds']:.0f} s, {run['trainers']} trainers, {items:,} items")
    print(
        f"epochs {totals['epochs'] + checked}, items read {totals['items'] + checked * items:,}, "
        f"faults injected {sum(faults.values())} "
        f"(trainer {faults['trainer']}, actor {faults['actor']}, drop {faults['drop']})"
    )
    errors = len(totals["errors"])
    print(f"errors seen {errors}, wrong items {wrong}, trainers stuck {end['stuck']}")
    for error in totals["errors"][:5]:
        print(f"  error: {error}")
    print(
        f"leaked: actors {end['actors']}, objects {end['objects']}, "
        f"processes {end['processes']} (objects held until gc.collect(): {end['before_gc']})"
    )
    leaked = end["actors"] or end["objects"] or end["processes"]
    return 1 if wrong or totals["errors"] or end["stuck"] or leaked else 0


def main(argv: list[str] | None = None) -> int:
    """Run the soak (or, with ``--trainer``, one trainer process of it)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--trainers", type=int, default=3)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--fault-every", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-preload", action="store_true", help="no trainer asks for a preload")
    parser.add_argument("--trainer", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--preload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trainer:
        trainer(args.trainer, args.items, args.until, args.preload, args.seed)
        return 0
    return soak(
        args.seconds, args.trainers, args.items, args.fault_every, args.seed, not args.no_preload
    )


if __name__ == "__main__":
    raise SystemExit(main())
