"""DDP with torchrun: every rank attaches one shared raycache cache by name.

Run K ranks on one node (gloo on CPU, nccl when there are GPUs)::

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --items 4096

With ``--address`` (or a Ray started by ``ray start --head``) every rank attaches to
that Ray; without one, rank 0 starts a local Ray and tells the other ranks its
address, so that all ranks share one cache either way.

Every rank builds the same ``CachedDataset`` with the same ``raycache.name``: the
first rank to attach creates the cache, the preload runs once for all of them, and
every rank reads its ``DistributedSampler`` shard (shuffle=True, ``set_epoch`` each
epoch) from the same bytes in shared memory. Each rank checks that it received
exactly its shard with the right values and, with ``--result-dir``, writes what it
saw to ``rank-<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch.distributed as dist

from raycache import CachedDataset
from raycache.tools.train.data import NpyCutouts, SyntheticCutouts, parse_shape
from raycache.tools.train.loop import LoopSettings, setup_distributed, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=4096, help="synthetic cutouts")
    p.add_argument("--shape", default="3x64x64")
    p.add_argument("--data-dir", default=None, help="read .npy shards (write_cutouts) instead")
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated per-read latency")
    p.add_argument("--name", default="ddp-example", help="the cache name all ranks share")
    p.add_argument("--address", default=None, help="Ray address (default: rank 0's Ray)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--start-method", default=None, choices=["fork", "spawn"])
    p.add_argument("--result-dir", default=None, help="write rank-<r>.json here")
    p.add_argument("--drop", action="store_true", help="rank 0 frees the cache at the end")
    return p.parse_args()


def shared_ray_address(rank: int, world: int, address: str | None) -> str:
    """Return one Ray address for all ranks: rank 0 attaches (or starts one) and tells.

    Each rank left to itself would attach to whatever Ray it finds, or start a Ray of
    its own when there is none: K caches instead of one.
    """
    if address is None and rank == 0:
        from raycache.runtime import ensure_ray, gcs_address

        ensure_ray(None)  # the running Ray, else an embedded one owned by rank 0
        address = gcs_address()
    if world > 1:
        box = [address]
        dist.broadcast_object_list(box, src=0)
        address = box[0]
    return address


def main() -> int:
    args = parse_args()
    rank, world, device = setup_distributed()  # torchrun's env; gloo on CPU, nccl on GPU
    address = shared_ray_address(rank, world, args.address)

    if args.data_dir:
        provider = NpyCutouts(args.data_dir, latency_ms=args.latency_ms)
    else:
        provider = SyntheticCutouts(args.items, parse_shape(args.shape), latency_ms=args.latency_ms)
    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 8},
        "raycache": {"name": args.name, "address": address},
    }
    # Same name on every rank: one cache, one preload, one copy of the data on the node.
    dataset = CachedDataset(provider, config)

    def report(record: dict) -> None:
        shard = record["shard"]
        ok = shard["order_errors"] == 0 and shard["bad_values"] == 0
        print(
            f"epoch {record['epoch']}: {record['seconds']:.2f} s, "
            f"{record['items_per_s']:.0f} items/s, hit ratio {record['hit_ratio'] or 0:.2f}, "
            f"rank 0 shard ok: {ok}",
            flush=True,
        )

    settings = LoopSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        start_method=args.start_method,
        record_indices=args.result_dir is not None,
    )
    start = time.perf_counter()
    records = train(dataset, settings, device=device, on_epoch=report)
    if args.result_dir:
        out = {
            "rank": rank,
            "world": world,
            "length": len(dataset),
            "seconds": time.perf_counter() - start,
            "epochs": records,
            "stats": {k: v for k, v in dataset.cache.stats().items() if k != "preload_errors"},
        }
        Path(args.result_dir, f"rank-{rank}.json").write_text(json.dumps(out, default=str))
    if world > 1:
        dist.barrier()  # every rank is done reading before anyone detaches or drops
    dataset.cache.close()
    if args.drop and rank == 0:
        from raycache import drop_cache

        drop_cache(args.name, address=address)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
