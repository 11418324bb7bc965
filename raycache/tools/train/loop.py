"""One training loop for every way of running several trainers on one node.

``train`` runs epochs of a small CNN over a ``DistributedSampler`` shard (shuffled,
``set_epoch`` each epoch) and returns one record per epoch: time, items/s, cache hit
ratio, cache bytes, node memory, and a check that this rank received exactly its
shard, in sampler order, with the values the provider must hold. It only needs an
initialised ``torch.distributed`` process group when there is more than one rank, so
torchrun, Ray Train and the demo's own launcher all call it the same way.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

__all__ = [
    "LoopSettings",
    "SmallCNN",
    "memory_snapshot",
    "setup_distributed",
    "train",
    "trainer_pids",
]


@dataclasses.dataclass
class LoopSettings:
    """What ``train`` does.

    Attributes
    ----------
    epochs : int
        Epochs to run.
    batch_size : int
        Items per batch per rank.
    lr : float
        Adam learning rate.
    num_workers : int
        DataLoader worker processes (0: read in the trainer itself).
    start_method : str or None
        DataLoader workers' start method (``"fork"``, ``"spawn"``); None for the
        platform default (fork on Linux).
    seed : int
        Sampler and model seed (the same on every rank).
    verify : bool
        Check every item against the provider's ``expected(idx)``.
    record_indices : bool
        Keep the indices each epoch received (for tests).
    memory : bool
        Rank 0 measures node memory (PSS) at the end of each epoch.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    num_workers: int = 0
    start_method: str | None = None
    seed: int = 0
    verify: bool = True
    record_indices: bool = False
    memory: bool = True


class SmallCNN(nn.Module):
    """Two strided convolutions, global pooling and a linear layer: two classes.

    Parameters
    ----------
    channels : int
        Input channels.
    """

    def __init__(self, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images ``(B, C, H, W)``."""
        return self.head(self.features(x))


def setup_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment, if not joined yet.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (set by torchrun and by the demo's launcher). Without ``WORLD_SIZE`` this is a
    single process and no group is made.

    Parameters
    ----------
    backend : str, optional
        ``"gloo"`` or ``"nccl"``; default nccl when a GPU is present, else gloo.

    Returns
    -------
    tuple
        ``(rank, world_size, device)``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trainer_pids(world: int) -> list[int]:
    """Return every rank's process id (a collective call when ``world`` > 1).

    Parameters
    ----------
    world : int
        The number of ranks.

    Returns
    -------
    list of int
        Pids in rank order.
    """
    pids: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(pids, os.getpid())
        return [int(p) for p in pids]
    return [os.getpid()]


def _cache_counters(dataset: Any) -> tuple[int, int, int]:
    """Return (hits, misses, cache bytes) of the dataset's cache; zeros without one."""
    cache = getattr(dataset, "cache", None)
    if cache is None or not cache.config.use_cache:
        return 0, 0, 0
    stats = cache.stats()
    client = stats.get("client", {})
    return int(client.get("hits", 0)), int(client.get("misses", 0)), int(stats["bytes"])


class _Checker:
    """Compares what a rank received with its sampler's order and the true values."""

    def __init__(self, order: list[int], reference: Any, verify: bool):
        self.order = order
        self.reference = reference if verify else None
        self.pos = 0
        self.order_errors = 0
        self.bad_values = 0
        self.seconds = 0.0
        self.indices: list[int] = []

    def check(self, batch: dict) -> None:
        start = time.perf_counter()
        got = batch["index"].tolist()
        want = self.order[self.pos : self.pos + len(got)]
        self.order_errors += sum(g != w for g, w in zip(got, want)) + abs(len(got) - len(want))
        self.pos += len(got)
        self.indices.extend(got)
        if self.reference is not None:
            images = batch["image"].numpy()
            labels = batch["label"].tolist()
            for k, idx in enumerate(got):
                true = self.reference.expected(idx)
                if labels[k] != true["label"] or not np.array_equal(images[k], true["image"]):
                    self.bad_values += 1
        self.seconds += time.perf_counter() - start

    def finish(self) -> None:
        self.order_errors += len(self.order) - self.pos


def train(
    dataset: Any,
    settings: LoopSettings | None = None,
    reference: Any = None,
    device: torch.device | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``SmallCNN`` on this rank's shard of ``dataset`` and check what it received.

    Parameters
    ----------
    dataset : Dataset
        Items ``{"image", "label", "index"}``; a ``CachedDataset`` or the provider itself.
        When it has a ``collate`` attribute that is the DataLoader's ``collate_fn``.
    settings : LoopSettings, optional
        Epochs, batch size, DataLoader workers, checks.
    reference : Any, optional
        Has ``expected(idx)``, the true item (default: ``dataset.provider`` or
        ``dataset``); used when ``settings.verify``.
    device : torch.device, optional
        Where the model runs (default CPU).
    on_epoch : callable, optional
        Called on rank 0 with each epoch's record as soon as it is known.

    Returns
    -------
    list of dict
        One record per epoch with ``epoch``, ``seconds`` (slowest rank, checks
        excluded), ``items`` (all ranks), ``items_per_s``, ``hits``, ``misses``,
        ``hit_ratio`` (all ranks), ``cache_bytes``, ``loss``, ``memory`` (rank 0 only:
        ``raycache.tools.memory.node_memory`` totals, without the per-process table), and
        this rank's ``shard``: ``expected`` and ``seen`` item counts, ``order_errors``
        and ``bad_values`` (both 0 when the rank got exactly its shard with the right
        values), and ``indices`` when ``settings.record_indices``.
    """
    settings = settings or LoopSettings()
    device = device or torch.device("cpu")
    rank, world = _world()
    if reference is None:
        reference = getattr(dataset, "provider", dataset)
    model, optimizer = _model(reference, world, device, settings)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed
    )
    loader = _loader(dataset, sampler, settings)
    pids = trainer_pids(world) if settings.memory else []
    records = []
    for epoch in range(settings.epochs):
        sampler.set_epoch(epoch)
        record = _epoch(
            epoch, dataset, (model, optimizer, loader), sampler, reference, device, settings, pids
        )
        records.append(record)
        if on_epoch is not None and rank == 0:
            on_epoch(record)
    return records


def _epoch(
    epoch: int,
    dataset: Any,
    parts: tuple[nn.Module, torch.optim.Optimizer, DataLoader],
    sampler: DistributedSampler,
    reference: Any,
    device: torch.device,
    settings: LoopSettings,
    pids: list[int],
) -> dict:
    """Train one epoch and return its record (see :func:`train`)."""
    model, optimizer, loader = parts
    rank, world = _world()
    checker = _Checker(list(iter(sampler)), reference, settings.verify)
    hits0, misses0, _ = _cache_counters(dataset)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    loss_sum = _train_epoch(model, optimizer, loader, checker, device)
    # The checks run inside the loop; their time is not the data path's.
    seconds = time.perf_counter() - start - checker.seconds
    hits1, misses1, cache_bytes = _cache_counters(dataset)
    totals = [checker.pos, hits1 - hits0, misses1 - misses0, float(loss_sum)]
    record = _record(epoch, seconds, totals, world, settings)
    record["cache_bytes"] = cache_bytes
    record["memory"] = memory_snapshot(pids) if settings.memory and rank == 0 else None
    record["shard"] = _shard(checker, rank, settings)
    return record


def _model(
    reference: Any, world: int, device: torch.device, settings: LoopSettings
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Build the seeded model (DDP-wrapped with several ranks) and its optimizer."""
    torch.manual_seed(settings.seed)
    channels = int(getattr(reference, "shape", (3,))[0])
    model: nn.Module = SmallCNN(channels).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model, torch.optim.Adam(model.parameters(), lr=settings.lr)


def _loader(dataset: Any, sampler: DistributedSampler, settings: LoopSettings) -> DataLoader:
    """Return the DataLoader over this rank's shard; ``dataset.collate`` when it has one."""
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.num_workers,
        collate_fn=getattr(dataset, "collate", None),
        multiprocessing_context=settings.start_method if settings.num_workers else None,
        persistent_workers=settings.num_workers > 0 and settings.start_method == "spawn",
    )


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    checker: _Checker,
    device: torch.device,
) -> torch.Tensor:
    """Train one epoch, checking every batch; return the summed loss over its items."""
    loss_sum = torch.zeros((), device=device)
    for batch in loader:
        checker.check(batch)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
    checker.finish()
    return loss_sum


def _record(
    epoch: int, seconds: float, totals: list[float], world: int, settings: LoopSettings
) -> dict:
    """Sum this epoch's counts over the ranks and take the slowest rank's time."""
    summed = torch.tensor(totals, dtype=torch.float64)
    elapsed = torch.tensor([seconds], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(summed)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    items, hits, misses, loss_total = summed.tolist()
    return {
        "epoch": epoch + 1,
        "seconds": float(elapsed),
        "items": int(items),
        "items_per_s": items / max(float(elapsed), 1e-9),
        "hits": int(hits),
        "misses": int(misses),
        # Reads made in DataLoader workers are not in this process's counters.
        "hit_ratio": (hits / (hits + misses) if hits + misses else 0.0)
        if settings.num_workers == 0
        else None,
        "loss": loss_total / max(items, 1),
    }


def _shard(checker: _Checker, rank: int, settings: LoopSettings) -> dict:
    """Return what this rank received against its sampler's shard."""
    shard = {
        "rank": rank,
        "expected": len(checker.order),
        "seen": checker.pos,
        "order_errors": checker.order_errors,
        "bad_values": checker.bad_values,
        "verified": settings.verify,
    }
    if settings.record_indices:
        shard["indices"] = checker.indices
    return shard


def memory_snapshot(pids: list[int]) -> dict | None:
    """Return ``node_memory`` totals for these trainers, their workers and Ray.

    Parameters
    ----------
    pids : list of int
        Trainer processes.

    Returns
    -------
    dict or None
        The totals, without the per-process table; None where PSS cannot be read.
    """
    from raycache.tools.memory import node_memory

    try:
        usage = node_memory(pids, children=True)
    except OSError:
        return None
    usage.pop("processes")
    return usage
