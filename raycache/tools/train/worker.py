"""One trainer rank of ``raycache demo``: ``python -m raycache.tools.train.worker``.

The demo starts K of these with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...), so they form a gloo process group exactly as under torchrun.
Rank 0 prints one ``RAYCACHE {json}`` line per event on stdout (the memory baseline,
then each epoch's record) for the demo to turn into its table; every rank writes its
records to ``<result-dir>/rank-<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from raycache.tools.train.data import NpyCutouts, SyntheticCutouts, parse_shape
from raycache.tools.train.loop import (
    LoopSettings,
    memory_snapshot,
    setup_distributed,
    train,
    trainer_pids,
)

__all__ = ["emit", "main", "parse_args"]

MARK = "RAYCACHE "


def emit(kind: str, payload: dict) -> None:
    """Print one event line for the demo's launcher.

    Parameters
    ----------
    kind : str
        ``"baseline"``, ``"epoch"`` or ``"done"``.
    payload : dict
        JSON-serialisable content.
    """
    print(MARK + json.dumps({"kind": kind, **payload}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the rank's options (the demo passes them; see ``raycache demo --help``).

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        The options.
    """
    p = argparse.ArgumentParser(prog="python -m raycache.tools.train.worker")
    p.add_argument("--data-dir", default=None, help="shards from write_cutouts; else synthetic")
    p.add_argument("--items", type=int, default=1024)
    p.add_argument("--shape", default="3x64x64")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--no-cache", action="store_true", help="read the provider every epoch")
    p.add_argument("--no-preload", action="store_true")
    p.add_argument("--preload-threads", type=int, default=8, help="provider reads in flight")
    p.add_argument("--name", default="raycache-demo")
    p.add_argument("--address", default=None, help="Ray address to attach to")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--start-method", default=None, choices=["fork", "spawn"])
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--record-indices", action="store_true")
    p.add_argument("--result-dir", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one rank: join the group, attach the cache, train, report.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0; a failure raises, and the launcher sees the exit status.
    """
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    if args.data_dir:
        provider = NpyCutouts(args.data_dir, latency_ms=args.latency_ms)
    else:
        provider = SyntheticCutouts(args.items, parse_shape(args.shape), latency_ms=args.latency_ms)
    settings = LoopSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        start_method=args.start_method,
        verify=not args.no_verify,
        record_indices=args.record_indices,
    )
    if not args.no_cache:
        from raycache.runtime import ensure_ray

        ensure_ray(args.address)
    _baseline(rank, world)
    if args.no_cache:
        dataset = provider
    else:
        from raycache import CachedDataset

        config = {
            "data_set": {
                "use_cache": True,
                "preload_cache": not args.no_preload,
                "preload_threads": args.preload_threads,
            },
            "raycache": {"name": args.name, "address": args.address},
        }
        dataset = CachedDataset(provider, config)
    on_epoch = (lambda record: emit("epoch", record)) if rank == 0 else None
    records = train(dataset, settings, device=device, on_epoch=on_epoch)
    if args.result_dir:
        out = Path(args.result_dir) / f"rank-{rank}.json"
        out.write_text(json.dumps({"rank": rank, "world": world, "epochs": records}))
    if world > 1:
        dist.barrier()  # nobody detaches while another rank still reads
    if rank == 0 and not args.no_cache:
        emit("done", {"stats": _stats(dataset)})
    if hasattr(dataset, "cache"):
        dataset.cache.close()
    if world > 1:
        dist.destroy_process_group()
    return 0


def _baseline(rank: int, world: int) -> None:
    """Rank 0 reports node memory once every rank is up and before any data is read."""
    pids = trainer_pids(world)
    if world > 1:
        dist.barrier()
    if rank == 0:
        emit("baseline", {"memory": memory_snapshot(pids), "pids": pids})
    if world > 1:
        dist.barrier()


def _stats(dataset: object) -> dict:
    stats = dataset.cache.stats()  # type: ignore[attr-defined]
    return {k: stats[k] for k in ("items", "bytes", "chunks", "preload", "clients")}


if __name__ == "__main__":
    sys.exit(main())
