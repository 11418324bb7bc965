"""Helpers of the fault tests: the end-to-end integrity check, and the directory actor's pid.

Every fault row ends with ``assert_epoch_matches``: every index of an epoch read through
``CachedDataset`` (its batched ``__getitems__``, as a DataLoader reads) and compared with
what the provider returns for it, value, dtype and shape of every leaf. A fault may make
reads slower; it must never make one wrong.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import ray
import torch

from raycache.directory import directory_actor


def assert_same_item(got: Any, want: Any, where: str) -> None:
    """Assert that ``got`` equals ``want`` leaf by leaf: type, dtype, shape and values."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {got!r}"
        for key in want:
            assert_same_item(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for k, (g, w) in enumerate(zip(got, want)):
            assert_same_item(g, w, f"{where}[{k}]")
    elif isinstance(want, np.ndarray):
        if isinstance(got, torch.Tensor):
            got = got.numpy()
        assert isinstance(got, np.ndarray), f"{where}: {type(got).__name__}, not an array"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want), f"{where}: values differ"
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


def assert_epoch_matches(ds: Any, provider: Any, batch: int = 32, skip: Any = ()) -> int:
    """Read every index of ``ds`` in batches and compare each item with ``provider``.

    ``skip``: indices left out (those the provider cannot read). Returns the number of
    items checked.
    """
    shuffled = np.random.default_rng(0).permutation(len(provider)).tolist()
    order = [i for i in shuffled if i not in skip]
    for start in range(0, len(order), batch):
        indices = order[start : start + batch]
        items = ds.__getitems__(indices)
        assert len(items) == len(indices)
        for idx, item in zip(indices, items):
            assert_same_item(item, provider[idx], f"item {idx}")
    return len(order)


class UnsupportedItems:
    """A provider whose every item holds a value no cache can store (an ``object()``)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": np.zeros(4, dtype=np.float32), "handle": object()}


class HangsAt:
    """A map-style provider whose read of index ``hang_at`` does not return for ``hang_s``."""

    def __init__(self, n: int, hang_at: int, hang_s: float):
        self.n = n
        self.hang_at = hang_at
        self.hang_s = hang_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.hang_at:
            time.sleep(self.hang_s)  # a read stuck on a dead network file system
        return {"image": np.full((2, 3), i, dtype=np.float64), "label": i}


def store_objects() -> int:
    """Return how many objects the object stores of this Ray's alive nodes hold now."""
    from ray._private.internal_api import node_stats

    total = 0
    for node in ray.nodes():
        if node["Alive"]:
            reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"])
            total += reply.store_stats.num_local_objects
    return total


def actor_pid(name: str, namespace: str = "raycache") -> int:
    """Return the pid of cache ``name``'s directory actor process."""
    actor = directory_actor(name, namespace)
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
