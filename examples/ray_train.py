"""Ray Train: K TorchTrainer workers on one node share one raycache cache.

    python examples/ray_train.py --workers 2 --items 4096

Ray Train starts the workers as Ray actors and sets up their torch process group
(gloo on CPU); each worker builds the same ``CachedDataset`` with the same
``raycache.name``, so they attach to one cache from inside the workers, one preload
runs, and the training loop is the one the torchrun example runs.

Preload tasks need a CPU of their own: with ``--cpus-per-worker 1`` on a node with as
many CPUs as workers, the workers hold every CPU and the preload cannot run (measured:
an epoch of 256 items took 254 s instead of ~2 s, each miss waiting on a unit that
never started), so give the workers less (the default, 0.5), the node more CPUs, or the
preload less with ``raycache.preload_cpus`` (for example 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def train_loop_per_worker(config: dict) -> None:
    """Run on every Ray Train worker: attach the shared cache, train, check the shard."""
    from raycache import CachedDataset
    from raycache.tools.train.data import SyntheticCutouts, parse_shape
    from raycache.tools.train.loop import LoopSettings, setup_distributed, train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    _, world, device = setup_distributed()  # Ray Train made the process group already
    provider = SyntheticCutouts(config["items"], parse_shape(config["shape"]))
    dataset = CachedDataset(
        provider,
        {
            "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 8},
            # The worker is connected to Ray already: no address needed.
            "raycache": {"name": config["name"]},
        },
    )
    settings = LoopSettings(
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        record_indices=config["result_dir"] is not None,
    )
    records = train(dataset, settings, device=device, on_epoch=_report)
    if config["result_dir"]:
        out = {"rank": rank, "world": world, "length": len(dataset), "epochs": records}
        Path(config["result_dir"], f"rank-{rank}.json").write_text(json.dumps(out))
    last = records[-1] if records else {}
    ray.train.report({"epochs": len(records), "seconds": last.get("seconds", 0.0)})
    dataset.cache.close()


def _report(record: dict) -> None:
    shard = record["shard"]
    ok = shard["order_errors"] == 0 and shard["bad_values"] == 0
    print(
        f"epoch {record['epoch']}: {record['seconds']:.2f} s, {record['items_per_s']:.0f} "
        f"items/s, hit ratio {record['hit_ratio']:.2f}, rank 0 shard ok: {ok}",
        flush=True,
    )


def run(
    workers: int = 2,
    items: int = 4096,
    shape: str = "3x64x64",
    epochs: int = 3,
    batch_size: int = 64,
    name: str = "ray-train-example",
    cpus_per_worker: float = 0.5,
    result_dir: str | None = None,
    storage_path: str | None = None,
) -> ray.train.Result:
    """Train with ``workers`` Ray Train workers on the connected Ray; return the result.

    Parameters
    ----------
    workers : int
        Ray Train workers (trainer processes).
    items, shape, epochs, batch_size : int, str, int, int
        The synthetic dataset and the loop.
    name : str
        The cache every worker attaches to.
    cpus_per_worker : float
        Logical CPUs each worker reserves; leave some for the preload tasks.
    result_dir : str, optional
        Each worker writes ``rank-<r>.json`` (what it saw, per epoch) here.
    storage_path : str, optional
        Ray Train's storage (checkpoints, results); default a temporary directory.

    Returns
    -------
    ray.train.Result
        The run's result.
    """
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "items": items,
            "shape": shape,
            "epochs": epochs,
            "batch_size": batch_size,
            "name": name,
            "result_dir": result_dir,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name, storage_path=storage_path or tempfile.mkdtemp(prefix="raycache-train-")
        ),
    )
    return trainer.fit()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--items", type=int, default=4096)
    p.add_argument("--shape", default="3x64x64")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--name", default="ray-train-example")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument(
        "--address",
        default=None,
        help="Ray address (default: RAY_ADDRESS, set inside a submitted job; else a local Ray)",
    )
    p.add_argument("--result-dir", default=None)
    args = p.parse_args()
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local")
    try:
        result = run(
            args.workers,
            args.items,
            args.shape,
            args.epochs,
            args.batch_size,
            args.name,
            args.cpus_per_worker,
            args.result_dir,
        )
        print(f"finished: {result.path}")
        from raycache import drop_cache

        drop_cache(args.name)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
