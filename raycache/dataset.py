"""``CachedDataset``: a map-style torch Dataset served from a shared raycache cache.

``DataLoader(CachedDataset(provider, config))`` trains as it would on the provider:
epoch 1 reads the provider and fills the cache, epochs 2+ are served from shared
memory. Batches are read with ``__getitems__`` (one vectorised copy per field) and
``collate_fn=ds.collate`` turns them into tensors without a per-item step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.utils.data

from raycache.data_cache import DataCache
from raycache.gathered import GatheredBatch, collate
from raycache.provider import read_raw_many
from raycache.thread_clock import cpu_and_wait

__all__ = ["CachedDataset"]

logger = logging.getLogger(__name__)

# While it waits for a preload unit, a process reads items the preload has not reached,
# but only while its provider reads spend less than this share of their time on its
# CPU: a read that waits (I/O) adds a reader, a read that computes takes a CPU from the
# preload's tasks (docs/design.md, "Spare reads": spare reads sped up a first epoch of
# sleeping reads and slowed one of computing reads).
SPARE_READ_CPU_SHARE = 0.5
# The thread's clock (``thread_clock.cpu_and_wait``, a read of /proc: ~27 us here, and
# ``time.thread_time`` alone, a system call, took 30-100 us on average and up to 13 ms,
# the thread preempted, in a trainer that fills the cache on a busy node) costs as much
# as a batch of cheap reads. The CPU share of reads is therefore sampled: the first
# READ_SAMPLE calls that read (an item, or a batch's misses), then one in READ_SAMPLE.
READ_SAMPLE = 16


class CachedDataset(torch.utils.data.Dataset):
    """A map-style Dataset that serves items from the cache and fills it on a miss.

    If ``data_set.preload_cache`` is set, the preload starts when the dataset is built.

    Parameters
    ----------
    provider : Any
        A Hyrax DataProvider (``len``, ``resolve_data``) or a map-style dataset.
    config : dict, CacheConfig, str or Path, optional
        The cache's config (see ``DataCache``).

    Attributes
    ----------
    cache : DataCache
        The dataset's cache.
    provider : Any
        The provider it reads on a miss.
    """

    def __init__(self, provider: Any, config: Any = None):
        self.provider = provider
        self._read_cpu_s = 0.0  # CPU and wall seconds of this process's provider reads
        self._read_wall_s = 0.0
        self._reads = 0  # calls reading the provider (an item or a batch's misses)
        self._spare_failed = False  # a spare read failed: read no more
        self.cache = DataCache(config, provider)
        self._misses = self.cache.miss_reads
        if self.cache.using_cache():
            # Attach now, not on first read: a DataLoader forks its workers before the
            # first read, and a forked worker can only use chunks mapped before the fork.
            self.cache.attach()
        try:
            self.cache.start_preload_thread()
        except BaseException:
            self.cache.close()  # do not leave a half-built dataset attached
            raise

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, idx: int) -> Any:
        # No wait here: the miss path below asks the actor once, and waits if a unit has it.
        item = self.cache.try_fetch(idx, wait=False)
        if item is None:
            idx = self.cache.check_index(idx)
            # As a batch's miss: reserved for this process unless a unit has it now.
            if self._misses.being_preloaded(np.array([idx], dtype=np.int64))[0]:
                item = self._misses.await_preloaded(idx)
            if item is None:
                item = self._read_and_insert(idx)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list:
        """Return the items at ``indices``, gathered with one copy per field when cached.

        Parameters
        ----------
        indices : Sequence[int]
            Provider indices (a batch from the sampler).

        Returns
        -------
        list
            The items, in order. When all were cached and share one structure, a
            ``GatheredBatch`` that ``collate`` turns into tensors directly.
        """
        items = self.cache.fetch_many(indices, wait=False)
        if isinstance(items, GatheredBatch) or all(item is not None for item in items):
            return items
        missing = [p for p, item in enumerate(items) if item is None]
        wanted = np.array([int(indices[p]) for p in missing], dtype=np.int64)
        held = self._misses.being_preloaded(wanted, spares=self._spares_wanted())
        # Misses no preload task holds are reserved for this process (the preload leaves
        # them out) and read here first, while the units being read go on: this process
        # reads alongside the preload instead of waiting idle and then reading. A miss
        # a preload task holds is waited for (reading spares meanwhile), then read here
        # if its unit failed.
        misses = list(zip(missing, wanted.tolist(), held.tolist()))
        self._read_batch(items, [(p, idx) for p, idx, waits in misses if not waits])
        for p, idx, waits in misses:
            if waits:
                item = self._misses.await_preloaded(idx, self._read_spare)
                items[p] = item if item is not None else self._read_and_insert(idx)
        return items

    def _read_spare(self) -> bool:
        """Read and insert a spare item reserved for this process; False if none is left.

        Called while this process waits for a preload unit: the wait then reads as a
        reader more, as a thread pool preloader's trainer does with its misses. Not
        while this process's reads compute more than they wait (see
        ``SPARE_READ_CPU_SHARE``).
        """
        if not self._spares_wanted():
            return False
        idx = self._misses.spare_index()
        if idx is None:
            return False
        try:
            self._read_and_insert(idx)
        except Exception as exc:
            # Nobody asked for this item: its error is the preload's to report (in
            # stats()["preload_errors"]) when it reaches it. Read no more spares.
            self._spare_failed = True
            logger.warning(
                "raycache %s: reading spare item %d failed (%s: %s); this process reads no "
                "more spare items, the preload reads them",
                self.cache.name,
                idx,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    def _spares_wanted(self) -> bool:
        return not self._spare_failed and (
            self._read_cpu_s <= SPARE_READ_CPU_SHARE * self._read_wall_s
        )

    def _read_batch(self, items: list, wanted: list[tuple[int, int]]) -> None:
        """Read ``(position, index)`` misses into ``items``; insert them as one batch.

        One insert per batch copies each field once (``DataCache.insert_many``), and
        the batch's reads are timed together (see ``_spares_wanted``). A read that
        fails raises once the items read before it are inserted; the failed index
        goes back to the preload.
        """
        if not wanted:
            return
        indices = [idx for _, idx in wanted]
        read: list = []
        try:
            self._read_many(indices, read)
        finally:
            for (p, _), item in zip(wanted, read):
                items[p] = item
            self.cache.insert_many(indices[: len(read)], read)

    def _read_and_insert(self, idx: int) -> Any:
        read: list = []
        self._read_many([idx], read)
        self.cache.insert_into_cache(idx, read[0])
        return read[0]

    def _read_many(self, indices: list[int], out: list) -> None:
        """Read misses reserved for this process into ``out``; a failed one goes back.

        The first READ_SAMPLE calls, then one in READ_SAMPLE, are timed for
        ``_spares_wanted``; the index whose read raised is released to the preload.
        """
        self._reads += 1
        timed = self._reads <= READ_SAMPLE or self._reads % READ_SAMPLE == 0
        if timed:
            wall, (cpu, waited) = time.perf_counter(), cpu_and_wait()
        try:
            read_raw_many(self.provider, indices, out)
        except BaseException:
            self._misses.release_reserved(indices[len(out)])
            raise
        finally:
            if timed:
                cpu_now, waited_now = cpu_and_wait()
                self._read_cpu_s += cpu_now - cpu
                # Less the time the thread waited for a CPU: on a busy machine a read
                # that computes waits for one, and would look like a read that waits.
                self._read_wall_s += time.perf_counter() - wall - (waited_now - waited)

    @staticmethod
    def collate(batch: Sequence[Any]) -> Any:
        """Collate items into tensors; fast for batches from ``__getitems__``.

        Parameters
        ----------
        batch : Sequence[Any]
            Items.

        Returns
        -------
        Any
            The batch (see ``raycache.gathered.collate``).
        """
        return collate(batch)
