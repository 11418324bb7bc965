"""``DataCache`` for Hyrax 0.9-0.13: Hyrax's per-dataset cache API on raycache's shared caches.

Hyrax 0.9+ builds one ``DataCache(config, datasets, augment_active)`` per
``DataProvider``, with ``datasets`` mapping friendly names to dataset instances, and keeps
two dicts per dataset in the process: base items by ``real_idx`` and augmented items by
the dataset's ``augment_cache_key``. Here each dataset's base items are one shared
raycache cache named by the dataset's identity (``raycache.identity``), so the train and
validate providers over one dataset, every DDP rank, every DataLoader worker and the
driver read and fill the same one; augmented items go to a second shared cache used as a
hash table of int64 keys (``raycache.hyrax.keyed``). Both are budgeted by
``raycache.max_bytes``.

What is kept from Hyrax exactly: the constructor, ``try_fetch`` returning
``(data or None, already_augmented)`` with the augment table asked first, ``insert_base``,
``insert_augmented`` (a None key opts out), ``disable``, ``_data_size``,
``logging_interval`` and the tensorboardX scalar names. What differs, by design: fetched
arrays are private copies (or read-only views with ``raycache.zero_copy``), not the very
objects inserted; an index or key already cached keeps its first value; an index
outside the dataset raises ``IndexError``.

The caches attach when this object is built and when it is unpickled (in a spawned DDP
rank or DataLoader worker): a DataLoader forks its workers before they read anything, and
a forked worker can only read what its parent had mapped (``raycache.client.forking``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raycache.config import CacheConfig
from raycache.data_cache import DataCache as SharedCache
from raycache.hyrax import fork_channel
from raycache.hyrax.fill import OnceFill
from raycache.hyrax.keyed import AugmentSlots, SlotSpace, check_key
from raycache.hyrax.plain import cache_tables, plain_item
from raycache.runtime import in_forked_child
from raycache.values import data_size

__all__ = ["DataCache"]


class DataCache:
    """Hyrax 0.9+'s per-provider cache, backed by one shared cache per dataset identity.

    Parameters
    ----------
    config : dict
        The Hyrax config (``data_set.use_cache`` and the ``raycache`` table are read).
    datasets : dict of str to dataset
        Friendly name to dataset instance, as Hyrax's ``DataProvider`` passes them.
    augment_active : dict of str to bool
        Friendly name to whether augmentation is active for it.
    """

    logging_interval = 1000
    augment_slots_per_item = 2
    """Rows of a dataset's augment table per dataset item (see ``raycache.hyrax.keyed``)."""

    def __init__(
        self, config: Any, datasets: Mapping[str, Any], augment_active: Mapping[str, bool]
    ):
        self.config = CacheConfig.coerce(cache_tables(config))
        self._use_cache = bool(self.config.use_cache)
        self._datasets = dict(datasets)
        self._augment_active = dict(augment_active)
        self._data_size_bytes = 0
        self._insert_count = 0
        self._base: dict[str, SharedCache] = {}
        self._fills: dict[str, OnceFill] = {}
        self._augment: dict[str, AugmentSlots] = {}
        self._token: int | None = None
        if self._use_cache:
            self._open()

    # ------------------------------------------------------------------ caches
    def _open(self) -> None:
        """Make (and attach) one shared base cache per dataset."""
        self._base = {name: SharedCache(self.config, ds) for name, ds in self._datasets.items()}
        self._serve()

    def _serve(self) -> None:
        """Attach the base caches; in a process that may fork workers, answer them."""
        for cache in self._base.values():
            cache.logging_interval = self.logging_interval
            # Attach now, before a DataLoader in this process forks its workers; a copy
            # unpickled inside a preload task stays inert.
            if cache.using_cache():
                cache.attach()
        if in_forked_child():
            return  # questions go to the parent, whose token this copy keeps
        self._fills = {name: OnceFill(cache) for name, cache in self._base.items()}
        self._token = fork_channel.register(self)

    def _forked_worker(self) -> bool:
        """Return True in a forked worker, which asks its parent instead of calling Ray."""
        return self._token is not None and fork_channel.child_link() is not None

    def answer_for(
        self, child: int, op: str, friendly_name: str, real_idx: int, data: Any = None
    ) -> Any:
        """Run a forked worker's ``"fetch"`` or ``"insert"`` here, in its parent.

        Parameters
        ----------
        child : int
            The worker (``raycache.fork_requests``' key): it reads what it claimed.
        op : str
            ``"fetch"`` (returns the item or None: the worker reads it) or ``"insert"``.
        friendly_name : str
            The dataset's friendly name.
        real_idx : int
            The index.
        data : Any
            The item, for ``"insert"``.

        Returns
        -------
        Any
            The item or None for ``"fetch"``; None for ``"insert"``.
        """
        fill = self._fills[friendly_name]
        if op == "fetch":
            return fill.fetch(real_idx, reader=child)
        if op == "insert":
            fill.insert(real_idx, data)
            return None
        raise ValueError(f"unknown operation {op!r}; a forked worker asks fetch or insert")

    def child_gone(self, child: int) -> None:
        """End the claims of a forked worker that exited before storing what it claimed.

        Parameters
        ----------
        child : int
            The worker's key.
        """
        for fill in list(self._fills.values()):
            fill.release(child)

    def _augment_table(self, friendly_name: str) -> AugmentSlots:
        table = self._augment.get(friendly_name)
        if table is None:
            base = self._base_of(friendly_name)
            slots = max(1, self.augment_slots_per_item * len(base))
            name = f"{base.name}-augmented"
            shared = SharedCache(self.config.replace(name=name), SlotSpace(base.name, slots))
            shared.logging_interval = self.logging_interval
            shared.attach()
            table = self._augment[friendly_name] = AugmentSlots(shared, slots)
        return table

    def _base_of(self, friendly_name: str) -> SharedCache:
        cache = self._base.get(friendly_name)
        if cache is None:
            raise KeyError(
                f"no dataset named {friendly_name!r} in this DataCache; it caches "
                f"{sorted(self._datasets)}"
            )
        return cache

    def _augment_key(self, friendly_name: str, real_idx: int, rng_seed: Any) -> int | None:
        if friendly_name not in self._datasets:
            self._base_of(friendly_name)  # raises, naming the known datasets
        key = self._datasets[friendly_name].augment_cache_key(real_idx, rng_seed)
        return None if key is None else check_key(key, friendly_name)

    @property
    def shared_caches(self) -> dict[str, SharedCache]:
        """The shared base cache of each dataset (empty when caching is off)."""
        return dict(self._base)

    # ------------------------------------------------------------------ Hyrax's API
    def disable(self) -> None:
        """Turn caching off in this process and detach from the shared caches.

        The shared caches stay for the other processes using them; what this process
        held for them (its mapped views, its buffered inserts, sent first) is released.
        """
        self._use_cache = False
        caches = list(self._base.values()) + [t.table for t in self._augment.values()]
        fills = list(self._fills.values())
        self._base, self._augment, self._fills = {}, {}, {}
        for fill in fills:
            fill.close()
        for cache in caches:
            cache.close()
        self._data_size_bytes = 0

    def try_fetch(
        self, friendly_name: str, real_idx: int, rng_seed: Any = None
    ) -> tuple[dict | None, bool]:
        """Fetch one dataset's fields for ``real_idx``: the augmented item first, if any.

        Parameters
        ----------
        friendly_name : str
            The dataset's friendly name.
        real_idx : int
            The dataset-local index.
        rng_seed : numpy.int64, optional
            The augmentation seed; None for non-augmented access.

        Returns
        -------
        tuple of (dict or None, bool)
            ``(data, already_augmented)``: the cached field dict or None on a miss, and
            whether it is the augmented item.

        Raises
        ------
        KeyError
            If ``friendly_name`` is not one of this cache's datasets.
        IndexError
            If ``real_idx`` is outside the dataset.
        """
        if not self._use_cache:
            return None, False
        if self._augment_active.get(friendly_name, False) and rng_seed is not None:
            key = self._augment_key(friendly_name, real_idx, rng_seed)
            if key is not None:
                cached = self._augment_table(friendly_name).get(key)
                if cached is not None:
                    return cached, True
        base = self._base_of(friendly_name)
        if self._forked_worker():
            # What was mapped when this worker forked, else one question to the parent
            # (``base.try_fetch`` would ask it a first time itself).
            idx, client = base.check_index(real_idx), base.attach()
            copy = not base.config.zero_copy
            cached = None if client is None else client.get_mapped(idx, copy)
            if cached is not None:
                client.count(hits=1)  # the parent's stats() counts it (a miss: the parent)
            else:
                cached = fork_channel.ask_parent(self._token, "fetch", friendly_name, real_idx)
            return cached, False
        fill = self._fills.get(friendly_name)
        return (base.try_fetch(real_idx) if fill is None else fill.fetch(real_idx)), False

    def insert_base(self, friendly_name: str, real_idx: int, data: dict[str, Any]) -> None:
        """Insert a dataset's non-augmented fields for ``real_idx``.

        Parameters
        ----------
        friendly_name : str
            The dataset's friendly name.
        real_idx : int
            The dataset-local index.
        data : dict
            The field dict.
        """
        if not self._use_cache:
            return
        base, data = self._base_of(friendly_name), plain_item(data)
        if self._forked_worker():
            fork_channel.ask_parent(self._token, "insert", friendly_name, real_idx, data)
        elif friendly_name in self._fills:
            self._fills[friendly_name].insert(real_idx, data)
        else:
            base.insert_into_cache(real_idx, data)
        self._counted(data)

    def insert_augmented(
        self, friendly_name: str, real_idx: int, rng_seed: Any, data: dict[str, Any]
    ) -> None:
        """Insert augmented fields under the dataset's ``augment_cache_key``.

        Nothing is stored when the dataset returns None for the key.

        Parameters
        ----------
        friendly_name : str
            The dataset's friendly name.
        real_idx : int
            The dataset-local index.
        rng_seed : numpy.int64
            The augmentation seed.
        data : dict
            The augmented field dict.

        Raises
        ------
        TypeError
            If the dataset's key is neither None nor an int64.
        """
        if not self._use_cache:
            return
        key = self._augment_key(friendly_name, real_idx, rng_seed)
        if key is None:
            return
        self._augment_table(friendly_name).put(key, plain_item(data))
        self._counted(data)

    def _counted(self, data: Any) -> None:
        self._insert_count += 1
        self._data_size_bytes += data_size(data)

    @staticmethod
    def _data_size(data: Any, seen: set[int] | None = None) -> int:
        """Return the bytes ``data`` occupies, each numpy buffer counted once.

        Parameters
        ----------
        data : Any
            An item.
        seen : set of int, optional
            ids of objects already counted.

        Returns
        -------
        int
            Size in bytes.
        """
        return data_size(data, seen)

    def close(self) -> None:
        """Detach this process from every shared cache (as ``disable``)."""
        self.disable()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # Augment tables, fills and the token are made again where the copy is unpickled.
        state.update(_augment={}, _fills={}, _token=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._use_cache:
            self._serve()
