"""Augmented items under sparse int64 keys, in a fixed number of shared slots.

Hyrax 0.9+ caches augmented items under a key the dataset chooses
(``augment_cache_key(real_idx, rng_seed)``): any int64, any number of them per index, so
they cannot be rows of a dense map of ``len(dataset)`` rows. raycache's shared cache is
such a dense map, and everything else about it (one copy per node, forked and spawned
DataLoader workers, DDP ranks, the ``max_bytes`` budget) is what augmented items need
too. So augmented items live in a second shared cache of ``slots`` rows, used as a
direct-mapped hash table: a key goes to row ``mix(key) % slots`` and the row stores the
key with the item.

What this guarantees: a fetch returns an item only when the stored key equals the key
asked for, so a collision is a miss, never another key's item. Two keys that share a
row cannot both be cached: the first one inserted keeps the row (the shared cache keeps
an index's first value), and the other is recomputed by Hyrax each time, exactly as
when the budget is full. ``slots`` bounds how many augmented items can be cached at
once; ``max_bytes`` bounds their bytes, as for base items.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["AugmentSlots", "SlotSpace", "slot_of"]

_MASK = (1 << 64) - 1


def slot_of(key: int, slots: int) -> int:
    """Return the row of ``key`` in a table of ``slots`` rows.

    The key is mixed first (splitmix64's finaliser) because datasets choose keys such
    as ``real_idx * n_variants + variant``: taken modulo ``slots`` directly, such keys
    would crowd into a few rows.

    Parameters
    ----------
    key : int
        The int64 key (negative keys are taken as their two's complement).
    slots : int
        How many rows the table has (positive).

    Returns
    -------
    int
        A row in ``[0, slots)``.
    """
    z = (int(key) + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) % slots


def check_key(key: Any, dataset: str) -> int:
    """Return an ``augment_cache_key`` result as an int, or raise naming the dataset.

    Parameters
    ----------
    key : Any
        What the dataset's ``augment_cache_key`` returned (not None).
    dataset : str
        The friendly name, for the message.

    Returns
    -------
    int
        The key.

    Raises
    ------
    TypeError
        If the key is not an integer that fits in int64.
    """
    if isinstance(key, bool) or not isinstance(key, (numbers.Integral, np.integer)):
        raise TypeError(
            f"augment_cache_key of dataset {dataset!r} returned {type(key).__name__} "
            f"{key!r}; raycache caches augmented items under int64 keys: return an int "
            "(or None to leave the item uncached)"
        )
    value = int(key)
    if not -(2**63) <= value < 2**63:
        raise TypeError(f"augment_cache_key of dataset {dataset!r} returned {value}, outside int64")
    return value


class SlotSpace:
    """The "provider" of an augment table: its length and what it is the table of.

    The shared cache derives its identity (and its mismatch check) from its provider;
    an augment table's identity is the base cache it belongs to and its row count.
    Items are never read from it: Hyrax computes augmented items itself.

    Parameters
    ----------
    base : str
        The name of the base cache (the dataset's identity).
    slots : int
        Row count.
    """

    def __init__(self, base: str, slots: int):
        self.base = base
        self.slots = int(slots)

    def __len__(self) -> int:
        return self.slots

    def __getitem__(self, idx: int) -> Any:
        raise LookupError(
            f"augmented items of {self.base!r} are computed by Hyrax, not read from the cache's "
            "provider; start no preload of an augment table"
        )


class AugmentSlots:
    """One dataset's augmented items, stored through a dense shared cache of slots.

    Parameters
    ----------
    table : Any
        A ``raycache.DataCache`` over a ``SlotSpace`` (``try_fetch``,
        ``insert_into_cache``, ``close``).
    slots : int
        Its row count.
    """

    def __init__(self, table: Any, slots: int):
        self.table = table
        self.slots = slots

    def get(self, key: int) -> dict | None:
        """Return the item stored under ``key``, or None (absent, or another key's row).

        Parameters
        ----------
        key : int
            The int64 key.

        Returns
        -------
        dict or None
            The augmented item.
        """
        row = self.table.try_fetch(slot_of(key, self.slots))
        if row is None or int(row["key"]) != key:
            return None
        return row["data"]

    def put(self, key: int, data: Any) -> None:
        """Store ``data`` under ``key`` unless its row is taken.

        Parameters
        ----------
        key : int
            The int64 key.
        data : Any
            The augmented item.
        """
        # The row stores its key: a later fetch of another key that maps here is a miss.
        self.table.insert_into_cache(slot_of(key, self.slots), {"key": np.int64(key), "data": data})

    def close(self) -> None:
        """Detach this process from the table."""
        self.table.close()
