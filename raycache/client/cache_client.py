"""``CacheClient``: one process's attachment to a cache, composed of the client's parts.

It attaches to the directory actor (``ActorLink``), keeps the map and the mapped
chunks (``LocalMap``), buffers inserts (``WriteBuffer``) and waits on the preload
(``PreloadWaits``); it counts hits and misses, answers reads and closes. The read path
(``get``, ``locate``, ``mapped``) touches only the local map and mapped chunks unless
an index is missing.

Guarantees: no call here raises because the cache was lost (the actor died, a call
timed out): the client marks itself ``dead`` and answers every read as a miss, so the
caller reads from its provider. Bad input (an unsupported item) still raises.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import ray

from raycache.chunk import Chunk, flatten_checked, flatten_item
from raycache.client.batch_put import put_batch
from raycache.client.fork_reads import ForkReads
from raycache.client.forking import ForkSide, forget, register
from raycache.client.link import LOST, cache_spec, link_to_directory
from raycache.client.local_map import STALE_S, LocalMap
from raycache.client.preload_waits import PreloadWaits
from raycache.client.warm_index import WarmReads
from raycache.client.write_buffer import WriteBuffer
from raycache.config import CacheConfig
from raycache.protocol import ROW_BITS, ROW_MASK
from raycache.runtime import ensure_ray

__all__ = ["CacheClient", "ClientState"]

logger = logging.getLogger(__name__)


class ClientState(NamedTuple):
    """What ``CacheClient.inspect`` reports: a snapshot of a client's inner state.

    Attributes
    ----------
    locations : numpy.ndarray
        A copy of the local map (``raycache.protocol`` locations).
    chunk_ids : list of int
        The live chunks the map knows of.
    spare_buffers : list of numpy.ndarray
        The write buffers kept for the next inserts.
    pins_held : int
        Retired chunks kept for forked children.
    pin_children : int
        Forked children the pins are kept for.
    preloading : bool
        A preload was running at the last reply.
    dead : bool
        The cache is lost for this process.
    warm_index : bool
        Batches are read through a ``WarmIndex`` of the map as it is now.
    """

    locations: np.ndarray
    chunk_ids: list[int]
    spare_buffers: list[np.ndarray]
    pins_held: int
    pin_children: int
    preloading: bool
    dead: bool
    warm_index: bool


class CacheClient:
    """The attached state of one cache in one process.

    Parameters
    ----------
    config : CacheConfig
        Validated settings.
    name : str
        The cache name.
    length : int
        Number of provider items.
    fingerprint : str
        Provider description checked against the cache's.

    Attributes
    ----------
    hits, misses : int
        Reads answered from the cache and not, counted by ``count``.
    waits : PreloadWaits
        Waits on the preload, reservations and spare items.
    warm : WarmReads
        Warm batches read through a ``WarmIndex`` while the map holds still.
    """

    def __init__(self, config: CacheConfig, name: str, length: int, fingerprint: str):
        ensure_ray(config.address)
        self.config = config
        self.name = name
        self.length = length
        self.pid = os.getpid()
        self.client_id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.timeout = float(config.timeout_s)
        spec = cache_spec(config, name, length, fingerprint)
        info = {"host": socket.gethostname(), "pid": self.pid}
        self.actor, self.settings, self._link = link_to_directory(
            config, spec, self.client_id, info
        )
        self.hits = 0
        self.misses = 0
        self._sent_counts = (0, 0)
        self.closed = False
        self._fork = ForkSide(name, self._buffer_item, self.count)
        self._map = LocalMap(self._link, length, self._fork.pins, self._counter_deltas)
        self._map.sync(force=True)
        self.warm = WarmReads(self._map)  # warm batches: one take per field
        self._buffer = WriteBuffer(
            self._link, self._map, self.settings, config, self._counter_deltas, self._filling_alone
        )
        asks = ForkReads(self, self._fork.drain)  # a forked child's misses, asked of its parent
        self.waits = PreloadWaits(self._link, self._map, self._buffer, asks)
        register(self)
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    # ------------------------------------------------------------------ state
    @property
    def dead(self) -> bool:
        """True once the cache is lost for this process (reads are misses from then on)."""
        return self._link.dead

    @property
    def forked(self) -> bool:
        """True in a forked child: it reads what was mapped at the fork, makes no Ray call."""
        return self._link.forked

    @property
    def preloading(self) -> bool:
        """True if a preload was running when the actor last answered this process."""
        return self._map.preloading

    def count(self, hits: int = 0, misses: int = 0) -> None:
        """Add reads to this client's hit and miss counts (reported with syncs).

        Parameters
        ----------
        hits : int
            Reads answered from the cache (negative to take back).
        misses : int
            Reads that were not (negative: a miss later answered, counted as a hit).
        """
        self.hits += hits
        self.misses += misses
        if self._link.forked:  # a DataLoader worker: its parent's stats() counts them
            self._fork.counted(hits, misses)

    def inspect(self) -> ClientState:
        """Return a snapshot of this client's inner state, for tests and diagnosis.

        Returns
        -------
        ClientState
            The map, the live chunks, kept write buffers, fork pins and flags.
        """
        return ClientState(
            locations=self._map.loc.copy(),
            chunk_ids=list(self._map.refs),
            spare_buffers=self._buffer.spares.buffers(),
            pins_held=self._fork.pins.held,
            pin_children=self._fork.pins.children,
            preloading=self._map.preloading,
            dead=self._link.dead,
            warm_index=self.warm.serves(),
        )

    # ------------------------------------------------------------------ reads
    def get(
        self,
        idx: int,
        copy: bool = True,
        wait: bool = True,
        meanwhile: Callable[[], bool] | None = None,
        refresh: bool = True,
    ) -> Any:
        """Return the cached item ``idx`` or None (idx already validated).

        With ``wait``, a miss on an index a preload task is reading waits for its unit
        (see ``PreloadWaits.await_unit``, and ``meanwhile`` there); without, it returns
        None at once, and while this process fills the cache alone it does not wait for
        the actor's answer either. Without ``refresh`` or ``wait`` it asks nothing (the
        caller's ``locate`` has just asked).
        """
        item = self.get_mapped(idx, copy)
        if item is not None:
            return item
        if self._buffer.holds(idx):
            item = self._buffer.item(idx)
            if item is not None:
                return item
        if self._link.forked:  # no Ray call here: the parent answers
            return self.waits.fork_reads.take(idx, wait)
        if not (refresh or wait):
            return None
        return self.get_mapped(idx, copy) if self._refresh(idx, wait, meanwhile) else None

    def get_mapped(self, idx: int, copy: bool = True) -> Any:
        """Return item ``idx`` if mapped here now (in a forked worker: at the fork), or None."""
        loc = int(self._map.loc[idx])
        # One item: the protocol's shift and mask inline (no helper call per read).
        view = self._map.view(loc >> ROW_BITS) if loc >= 0 else None
        return None if view is None else view.row(loc & ROW_MASK, copy)

    def locate(self, indices: np.ndarray, wait: bool = True) -> np.ndarray:
        """Return each index's location (``MISSING`` if missing), asking once (``wait``: get's)."""
        loc = self._map.loc[indices]
        if self._link.forked and (loc < 0).any():  # one question to the parent per batch
            self.waits.fork_reads.prefetch(indices[loc < 0], wait)
        elif (loc < 0).any() and self._refresh(int(indices[np.argmin(loc)]), wait):
            loc = self._map.loc[indices]
        return loc

    def mapped(self, cids: Any) -> dict[int, Chunk] | None:
        """Return the mapped chunk of each chunk id, or None if one cannot be mapped."""
        views = self._map.views
        try:
            return {c: views[c] for c in cids}
        except KeyError:
            chunks = dict(zip(cids, self._map.view_many(list(cids))))
            return None if any(v is None for v in chunks.values()) else chunks

    def views(self, cids: np.ndarray) -> list[Chunk | None]:
        """Return the mapped chunk for each chunk id (None where it cannot be mapped)."""
        return self._map.view_many([int(c) for c in cids])

    def sync(self, force: bool = False) -> None:
        """Bring the local map up to date with the directory actor."""
        self._map.sync(force)

    def _refresh(
        self, idx: int, wait: bool = True, meanwhile: Callable[[], bool] | None = None
    ) -> bool:
        """After a miss: learn what changed (rate-limited); True if ``idx`` is now cached.

        ``wait`` and ``meanwhile`` as for ``get`` (filling alone: ``LocalMap.poll``).
        """
        if self._link.dead or self._link.forked:
            return False
        if not wait and self._filling_alone():
            self._map.poll()
            return self._map.loc[idx] >= 0
        if self._map.sync_due():
            self._map.sync()
            if self._map.loc[idx] >= 0:
                return True
        if not wait:
            return False
        return self.waits.await_unit(idx, meanwhile)

    def _filling_alone(self) -> bool:
        """Return True while this process inserts and the map changes only through it.

        Then a miss is almost surely an item nobody has stored, and waiting for the
        actor to say so is wasted; at any other time (other trainers inserting, a
        preload running, warm epochs) a miss asks and waits, so items stored elsewhere
        are never read again. While a preload runs, this process's inserts are also
        what the preload waits for at its end (``raycache.reservations``): they are
        sent every ``flush_interval_s``, not a chunk's worth at a time.
        """
        if self._map.changed_elsewhere or self._map.preloading:
            return False
        return time.monotonic() - self._buffer.last_put < STALE_S

    # ------------------------------------------------------------------ writes
    def put(self, idx: int, item: Any) -> None:
        """Buffer ``item`` (validated and copied) for index ``idx``."""
        if self._link.forked:
            self._fork.send_from_child(idx, item)
            return
        leaves: list = []
        template = flatten_checked(item, leaves)  # a bad item fails here
        self._buffer_item(idx, item, (template, leaves))

    def put_many(self, indices: list[int], items: list) -> None:
        """Buffer items as ``put`` does each, one copy per field (``batch_put``)."""
        send = self._fork.send_from_child if self._link.forked else None  # to the parent
        put_batch(self._buffer, self._map.loc, indices, items, self._link.dead or self.closed, send)

    def _buffer_item(self, idx: int, item: Any, flat: tuple | None = None) -> None:
        """Buffer a validated item (parent side; also what forked children send).

        ``flat``: its ``(template, leaves)`` (``chunk.flatten_checked``), if known.
        """
        if self._link.dead or self.closed or self._map.loc[idx] >= 0:
            return  # cached already; the first value wins, as in the actor
        if flat is None:
            leaves: list = []
            flat = (flatten_item(item, leaves), leaves)
        self._buffer.add(idx, item, flat)

    def flush(self, timeout: float | None = None) -> bool:
        """Send buffered items now; True when the buffer is empty within ``timeout``."""
        if not self._link.forked and not self._link.dead:
            self._fork.drain()  # what forked workers have sent so far
        return self._buffer.flush(self.timeout if timeout is None else timeout)

    def _counter_deltas(self) -> tuple[int, int]:
        sent_hits, sent_misses = self._sent_counts
        hits, misses = self.hits, self.misses
        self._sent_counts = (hits, misses)
        return hits - sent_hits, misses - sent_misses

    # ------------------------------------------------------------------ lifetime
    def stats(self) -> dict:
        """Return the directory's counters plus this client's own."""
        if not self._link.usable():  # the link logged why once; the error says it
            raise self._link.unavailable()
        self.flush()
        self._map.reads.report_unsent()
        self._map.reads.flush(self.timeout)  # this process's byte counts are in the totals
        # Hits and misses travel in the call (a heartbeat might be counted after it).
        out = self._link.call("stats", self._link.client_id, *self._counter_deltas())
        if out is LOST:
            raise self._link.unavailable()
        out["client"] = _own_counts(self)
        return out

    def close(self) -> None:
        """Send buffered items, stop the background thread and detach from the cache."""
        if self.closed or os.getpid() != self.pid:
            return
        usable = not self._link.forked and not self._link.dead
        if usable:
            self.flush()
        self._fork.close()
        self.closed = True
        self._buffer.close(self.timeout)
        if usable and not self._link.dead and ray.is_initialized():
            self._map.forget_pending_reply()  # let Ray forget the reply while it is up
            self._map.reads.flush(self.timeout)  # byte counts not yet in the totals
            try:
                ray.get(
                    self.actor.detach.remote(self.client_id, *self._counter_deltas()),
                    timeout=self.timeout,
                )
            except Exception as exc:  # the cache may be gone: detaching is best effort
                logger.debug("raycache %s: detach failed: %s", self.name, exc)
        forget(self)

    # ------------------------------------------------------------------ fork hooks
    def prepare_fork(self) -> None:
        """Send buffered items, catch up and map every chunk, for children forked next.

        Skipped within a sync in this thread (raycache's own calls may fork): no deadlock.
        """
        if not self._map.lock.acquire(blocking=False):
            return
        self._map.lock.release()
        self.flush()
        self._map.sync(force=True)
        self._fork.before_fork(self._map.map_all())

    def after_fork_in_parent(self) -> None:
        """Start reading the inserts of the child just forked; keep what it can read."""
        self._fork.after_fork_in_parent()

    def after_fork_in_child(self) -> None:
        """Become a read-only client: serve mapped chunks, make no Ray call."""
        self._link.forked = True
        self._map.after_fork_in_child()
        self._buffer.after_fork_in_child()
        self._fork.after_fork_in_child()


def _own_counts(client: CacheClient) -> dict:
    """Return the ``client`` entry of ``stats()``: what this process read and holds."""
    reads = client._map.reads
    return {
        "hits": client.hits,
        "misses": client.misses,
        "pending": len(client._buffer),
        "read_bytes": reads.read,
        "crossed_bytes": reads.crossed,
        "insert_path": client._buffer.inserts.path,
    }
