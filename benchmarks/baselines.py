"""The baselines raycache is compared with: Hyrax's dict caches and the numpy limit."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmarks.providers import Provider

__all__ = ["GatherDataset", "ListDataset", "ThreadPoolCache", "identity"]


class ListDataset(Dataset):
    """Hyrax's dict cache, warm: items kept as Python objects in this process."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Any:
        return self.items[idx]


class GatherDataset(Dataset):
    """The memory-bandwidth limit: one numpy array per field, one fancy index per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> Any:
        return self.__getitems__([idx])

    def __getitems__(self, indices: Sequence[int]) -> dict:
        """Return the batch as tensors, gathered with one copy per field."""
        idx = np.asarray(indices)
        return {
            "image": torch.from_numpy(self.images[idx]),
            "label": torch.from_numpy(self.labels[idx]),
        }


class ThreadPoolCache(Dataset):
    """What Hyrax does: a dict cache filled by a background thread pool, plus misses.

    ``start()`` submits every index to a pool of ``threads`` threads, each reading the
    provider and inserting into the dict; a read that misses reads the provider itself
    and inserts, as Hyrax's ``DataCache`` does.
    """

    def __init__(self, provider: Provider, threads: int):
        self.provider = provider
        self.threads = threads
        self.items: dict[int, Any] = {}
        self.done_at: float | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start preloading every index in the background."""
        self._pool = ThreadPoolExecutor(max_workers=self.threads)
        futures = [self._pool.submit(self._load, i) for i in range(len(self.provider))]
        start = time.perf_counter()

        def finished(_: Any) -> None:
            if all(f.done() for f in futures):
                self.done_at = time.perf_counter() - start

        futures[-1].add_done_callback(finished)

    def _load(self, idx: int) -> None:
        if idx not in self.items:
            self.items[idx] = self.provider[idx]

    def stop(self) -> None:
        """Wait for the pool's threads to end."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.provider)

    def __getitem__(self, idx: int) -> Any:
        item = self.items.get(idx)
        if item is None:
            item = self.items[idx] = self.provider[idx]
        return item


def identity(batch: Any) -> Any:
    return batch
