"""Warm epochs with DataLoader workers: num_workers=0 against forked and spawned workers.

    python examples/dataloader_workers.py --items 4096 --workers 2

Preloads one cache, then times warm epochs (every item cached) reading batches only
and training the small CNN, with ``num_workers=0``, with forked workers (Linux's
default start method) and with spawned, persistent workers. The figures in
docs/multi-trainer.md come from this script.
"""

from __future__ import annotations

import argparse
import logging
import time

import ray
from torch.utils.data import DataLoader

from raycache import CachedDataset, drop_cache
from raycache.tools.train.data import SyntheticCutouts
from raycache.tools.train.loop import LoopSettings, train


def read_epoch(ds: CachedDataset, loader: DataLoader) -> float:
    """Return items/s of one pass over ``loader`` (batches only, no training)."""
    start = time.perf_counter()
    n = sum(len(batch["index"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="warm epochs timed per setting")
    args = p.parse_args()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    name = "dataloader-workers-example"
    try:
        ds = CachedDataset(
            SyntheticCutouts(args.items),
            {"data_set": {"preload_cache": True}, "raycache": {"name": name}},
        )
        assert ds.cache.wait_for_preload(timeout=600)
        settings = [("num_workers=0", 0, None)]
        settings += [(f"num_workers={args.workers} fork", args.workers, "fork")]
        settings += [(f"num_workers={args.workers} spawn", args.workers, "spawn")]
        print(f"{'setting':<22} {'read items/s':>13} {'train items/s':>14}")
        for label, workers, method in settings:
            loader = DataLoader(
                ds,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=ds.collate,
                multiprocessing_context=method,
                persistent_workers=workers > 0,
            )
            read_epoch(ds, loader)  # workers started, chunks mapped
            reads = [read_epoch(ds, loader) for _ in range(args.epochs)]
            del loader
            loop = LoopSettings(
                epochs=args.epochs + 1,
                batch_size=args.batch_size,
                num_workers=workers,
                start_method=method,
                verify=False,
                memory=False,
            )
            records = train(ds, loop)[1:]  # the first epoch starts the workers
            trains = [r["items_per_s"] for r in records]
            print(f"{label:<22} {max(reads):>13.0f} {max(trains):>14.0f}", flush=True)
        ds.cache.close()
    finally:
        drop_cache(name)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
