"""Warm epochs on a 2-node Ray cluster, with the preload's locality on and off.

    python -m benchmarks.cluster --items 2048 --shape 3x64x64 --reps 2

A ``ray.cluster_utils.Cluster`` of two nodes on this machine (each its own raylet and
object store), one trainer per node (a Ray task pinned by a custom resource). Each
repetition builds a fresh cache and preloads it, with ``raycache.locality`` ``"off"``
(chunks built wherever Ray runs the preload tasks) and ``"nodes"`` (each node's block
of indices built on that node), interleaved off, nodes, off, nodes. Both trainers then
read their node's block, shuffled, at the same time, twice (two epochs in one
process), through a DataLoader with ``raycache.collate``. Reported per mode: items/s of
each trainer's first and second warm epoch, and the chunk bytes that crossed nodes
(``stats()["crossed_bytes"]``) in the first.

Caveat: the two nodes share one machine, so "crossing the network" is a copy between
two object stores in the same memory over a local socket. The byte counts hold on a
real cluster; the speeds do not (a real network is slower, which favours locality more).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid

import numpy as np
import ray
import torch.utils.data
from ray.cluster_utils import Cluster

import raycache
from raycache import locality

BATCH = 64


class Cutouts:
    """``n`` items of ``shape`` float32, each filled with its index (cheap to make)."""

    def __init__(self, n: int, shape: tuple[int, ...]):
        self.n = n
        self.shape = shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": np.full(self.shape, float(i), dtype=np.float32), "label": int(i)}


def _config(name: str, mode: str, preload: bool) -> dict:
    return {
        "data_set": {"use_cache": True, "preload_cache": preload, "preload_threads": 4},
        "raycache": {"name": name, "locality": mode, "chunk_size": 256, "timeout_s": 60.0},
    }


@ray.remote(num_cpus=0)
def trainer(provider: Cutouts, config: dict, order: list[int], epochs: int) -> dict:
    """Read ``order`` ``epochs`` times on this node; items/s of each epoch, bytes crossed."""
    ds = raycache.CachedDataset(provider, config)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, sampler=order, collate_fn=raycache.collate
    )
    rates, crossed = [], []
    for _ in range(epochs):
        before = ds.cache.stats()["client"]["crossed_bytes"]
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            seen += len(batch["label"])
        rates.append(seen / (time.perf_counter() - start))
        crossed.append(ds.cache.stats()["client"]["crossed_bytes"] - before)
        if seen != len(order):
            raise RuntimeError(f"read {seen} items, expected {len(order)}")
    stats = ds.cache.stats()["client"]
    ds.cache.close()
    return {"items_per_s": rates, "crossed_bytes": crossed, "misses": stats["misses"]}


def run_once(provider: Cutouts, mode: str, node_of: dict[str, str], epochs: int) -> dict:
    """Preload a fresh cache in ``mode``, then read each node's block on that node."""
    name = f"bench-cluster-{uuid.uuid4().hex[:8]}"
    ds = raycache.CachedDataset(provider, _config(name, mode, preload=True))
    start = time.perf_counter()
    if not ds.cache.wait_for_preload(timeout=300):
        raise RuntimeError("the preload did not end in 300 s")
    preload_s = time.perf_counter() - start
    # The same reads in both modes: equal blocks over the nodes, as locality "nodes" plans.
    plan = locality.LocalityPlan.blocks(len(provider), locality.cluster_nodes())
    rng = np.random.default_rng(0)
    refs = {}
    for label, node in node_of.items():
        order = rng.permutation(plan.indices_on(node)).tolist()
        task = trainer.options(resources={label: 0.01})
        refs[label] = task.remote(provider, _config(name, mode, False), order, epochs)
    results = {label: ray.get(ref, timeout=600) for label, ref in refs.items()}
    stats = ds.cache.stats()
    ds.cache.close()
    raycache.drop_cache(name)
    return {
        "mode": mode,
        "preload_s": preload_s,
        "bytes": stats["bytes"],
        "crossed_bytes": stats["crossed_bytes"],
        "trainers": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON line per repetition and a summary table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--shape", default="3x64x64")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--store-mb", type=int, default=512, help="object store per node, MiB")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split("x"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = args.store_mb * 2**20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": store,
            "resources": {"node0": 1},
            "include_dashboard": False,
        },
    )
    runs = []
    try:
        cluster.add_node(num_cpus=1, object_store_memory=store, resources={"node1": 1})
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        node_of = {}
        for node in ray.nodes():
            for key in node["Resources"]:
                if key in ("node0", "node1"):
                    node_of[key] = node["NodeID"]
        provider = Cutouts(args.items, shape)
        for rep in range(args.reps):
            for mode in ("off", "nodes"):
                run = run_once(provider, mode, node_of, args.epochs)
                run["rep"] = rep
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    _summary(runs, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0


def _summary(runs: list[dict], args: argparse.Namespace) -> None:
    mb = args.items * int(np.prod([int(x) for x in args.shape.split("x")])) * 4 / 2**20
    print(f"\n{args.items} items of {args.shape} float32 ({mb:.0f} MiB), 2 nodes on one machine")
    print("| locality | epoch 1 items/s (node0, node1) | epoch 2 items/s | crossed MiB |")
    print("|---|---|---|---|")
    for run in runs:
        t = run["trainers"]
        first = ", ".join(f"{t[k]['items_per_s'][0]:,.0f}" for k in sorted(t))
        second = ", ".join(f"{t[k]['items_per_s'][-1]:,.0f}" for k in sorted(t))
        crossed = run["crossed_bytes"] / 2**20
        print(f"| {run['mode']} | {first} | {second} | {crossed:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
