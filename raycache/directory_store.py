"""Storing chunks for the directory actor: inserts, preloaded chunks and compaction.

The actor keeps its own copy of every chunk (``ray.put`` here), so that the bytes are
owned by the actor and outlive the process that read them. What is stored, where, and
what is merged is decided by ``ChunkMap``; this class does the Ray calls around it and
holds the lock that the map needs.

Guarantees: an index is stored once (the first value wins, whoever sent it); the live
chunks never hold more than ``max_bytes``; every registration wakes ``added``'s waiters.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk
from raycache.directory_map import ChunkMap
from raycache.protocol import INLINE_LIMIT, InsertResult

__all__ = ["ChunkStore"]

logger = logging.getLogger(__name__)


class ChunkStore:
    """The actor's chunks and map, and the lock that guards them.

    Parameters
    ----------
    name : str
        The cache name, for log messages.
    chunk_map : ChunkMap
        The (empty) map.
    lock : threading.RLock
        The actor's lock; ``added`` is a condition on it.
    """

    def __init__(self, name: str, chunk_map: ChunkMap, lock: threading.RLock):
        self.name = name
        self.map = chunk_map
        self.lock = lock
        self.added = threading.Condition(lock)  # notified when indices are mapped
        # Every ray.put this actor makes holds this (taken after ``lock``, never before
        # it): see ``_store_inserted``.
        self.put_lock = threading.Lock()
        self.inserted = 0  # items stored from clients' inserts
        self.preloaded = 0  # items stored from preload tasks
        self.dropped = False

    def insert(self, chunks: list[Chunk]) -> InsertResult:
        """Store the items of ``chunks`` that are not cached yet.

        The client's chunk arrives as an argument (its bytes owned by the client);
        the actor keeps its own copy with ``ray.put`` so that the bytes outlive the
        client. Indices already cached are dropped first, so two clients inserting
        the same index store and count it once.

        Parameters
        ----------
        chunks : list of Chunk
            The chunks a client sent.

        Returns
        -------
        InsertResult
            Items added and rejected (over ``max_bytes``), and how many map events this
            call made (``own_events``); ``sync`` is left None.
        """
        added = rejected = own_events = 0
        for chunk in chunks:
            result, events = self._insert_one(chunk)
            added += result.added
            rejected += result.rejected
            own_events += events
        return InsertResult(added, rejected, None, own_events)

    def _insert_one(self, chunk: Chunk) -> tuple[InsertResult, int]:
        """Store one chunk and compact what it completes; the result and events made."""
        result, due = self._store_inserted(chunk)
        events = 1 if result.added else 0
        if due and self._compact(due):
            events += 2
        return result, events

    def _store_inserted(self, chunk: Chunk) -> tuple[InsertResult, list[int]]:
        """Store one inserted chunk; return the result and the segments due to be merged.

        The ``ray.put`` runs under the lock, one insert at a time, and under
        ``put_lock``, which a merge's put holds too: with puts in parallel, freed store
        pages stay resident and trainers filling on miss grew the node's memory by more
        per byte of data, with no gain for the trainer (docs/design.md, "Writes").
        """
        with self.lock:
            if self.dropped:
                return InsertResult(0, len(chunk)), []
            keep = self.map.new_positions(chunk.indices)
            if not len(keep):
                return InsertResult(0, 0), []
            if len(keep) < len(chunk):
                chunk = chunk.take(keep)
            chunk, rejected = self._fit_budget(chunk)
            if not len(chunk):
                return InsertResult(0, rejected), []
            with self.put_lock:
                ref = ray.put(chunk)
            cid, added = self.map.register(ref, chunk.indices, chunk.nbytes)
            self.added.notify_all()
            self.inserted += added
            return InsertResult(added, rejected), self.map.note_segment(cid)

    def _fit_budget(self, chunk: Chunk) -> tuple[Chunk, int]:
        """Return the rows of ``chunk`` that fit the byte budget, and how many did not."""
        first = not self.map.rejected
        fits = self.map.rows_that_fit(chunk.nbytes, len(chunk))
        if fits == len(chunk):
            return chunk, 0
        if first:  # once per cache: each client says it once in its own process's log
            logger.warning(
                "raycache %s: byte budget max_bytes=%d reached with %d bytes stored; "
                "items over it are not cached (counted in stats()['rejected_items'])",
                self.name,
                self.map.max_bytes,
                self.map.nbytes,
            )
        return chunk.take(np.arange(fits)), len(chunk) - fits

    def _compact(self, cids: list[int]) -> bool:
        """Rewrite segments ``cids`` as one chunk and free them; False if dropped meanwhile.

        Fetching, concatenating and storing a chunk's worth of bytes takes tens of
        milliseconds; it runs outside the lock so that clients' syncs do not wait for
        it. Its put and an insert's wait for each other (``put_lock``). Segments are
        only ever retired here or by ``drop``, and inserts never remap a cached index,
        so the rows read outside the lock are still the ones the map points at, unless
        the cache was dropped meanwhile.
        """
        with self.lock:
            refs = [self.map.refs.get(c) for c in cids]
        if any(r is None for r in refs):
            return False
        merged = Chunk.concat(ray.get(refs))
        with self.put_lock:  # one put at a time, as inserts (not under ``lock``)
            ref = ray.put(merged)
        with self.lock:
            if self.dropped:
                return False
            self.map.register(ref, merged.indices, merged.nbytes, replace=True)
            self.map.retire(cids)
            self.added.notify_all()
            return True

    def add_preloaded(self, chunk_ref: Any, summary: dict) -> bool:
        """Register a chunk returned by a preload task; False once the budget is full."""
        with self.lock:
            if self.dropped:
                return False
            if summary["nbytes"] > self.map.max_bytes - self.map.nbytes:
                chunk, _ = self._fit_budget(ray.get(chunk_ref))
                if len(chunk):
                    with self.put_lock:
                        ref = ray.put(chunk)
                    _, added = self.map.register(ref, chunk.indices, chunk.nbytes)
                    self.preloaded += added
                    self.added.notify_all()
                return False
            if summary["nbytes"] < INLINE_LIMIT:
                # Small task returns live in this actor's heap and are copied into each
                # reader; put them into the shared store instead.
                small = ray.get(chunk_ref)
                with self.put_lock:
                    chunk_ref = ray.put(small)
            # Indices a trainer inserted while the unit was read stay as they are.
            _, added = self.map.register(chunk_ref, summary["indices"], summary["nbytes"])
            self.preloaded += added
            self.added.notify_all()
            return True

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Return the indices of ``indices`` that are not cached (takes the lock)."""
        with self.lock:
            return self.map.missing(indices)
