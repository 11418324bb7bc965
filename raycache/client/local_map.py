"""A process's copy of the cache's map, the chunks it has mapped, and how it catches up.

Reads never call the directory actor for an item in a chunk this process has mapped:
the map is a local int64 array (``raycache.protocol`` locations, ``MISSING`` where not
cached) and a mapped chunk is a set of numpy views of shared memory. Only a miss asks
the actor what changed (``sync``), at most every ``MIN_SYNC_S`` unless something says
the map is behind (``force_sync``).

Guarantees: replies are applied in version order (an older reply that arrives late is
dropped), so the map only moves forward; a retired chunk is handed to the fork pins
before this process drops it, so forked children can go on reading it; every change to
the locations or the mapped chunks adds one to ``changes`` after it is made, so what a
reader worked out from them (``raycache.client.warm_index``) is known to be current
while ``changes`` is what it was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk
from raycache.chunk_loss import LostEvent, unmap_lost
from raycache.client.chunk_fetch import fetch_chunk, fetch_chunks
from raycache.client.link import LOST, ActorLink
from raycache.fork_pins import ChildPins
from raycache.node_bytes import ReadCounter
from raycache.protocol import MISSING, AddEvent, Inflight, Snapshot, SyncReply, pack_locations

__all__ = ["FETCH_GROUP", "MIN_SYNC_S", "POLL_S", "STALE_S", "LocalMap"]

MIN_SYNC_S = 0.05
# A process that inserted this recently, into a cache nobody else changes, is filling
# it alone: a read that may not wait (a DataLoader batch) then trusts its map, learning
# newer changes from a sync reply it asked for at its last miss (see ``poll``). A map
# older than this is brought up to date first.
STALE_S = 1.0
# Least time between two checks for a sync reply by reads that may not wait.
POLL_S = 0.005
# Chunks fetched in one ``ray.get`` (``view_many``): a batch's chunks at once, and a call's
# timeout spent on at most this many chunks coming from other nodes.
FETCH_GROUP = 64


class LocalMap:
    """The map, the chunks it points into, and the preload units last heard of.

    Parameters
    ----------
    link : ActorLink
        The line to the directory actor.
    length : int
        Number of provider items.
    pins : ChildPins
        Where retired chunks go while forked children may read them.
    counts : Callable[[], tuple[int, int]]
        Returns the hits and misses to report with the next sync.
    """

    def __init__(
        self, link: ActorLink, length: int, pins: ChildPins, counts: Callable[[], tuple[int, int]]
    ):
        self.loc = np.full(length, MISSING, dtype=np.int64)
        self.version = 0
        self.changes = 0  # changes made to ``loc`` or ``views`` in this process
        self.refs: dict[int, Any] = {}  # chunk id -> ObjectRef
        self.views: dict[int, Chunk] = {}  # chunk id -> mapped chunk
        self.inflight: Inflight = {}  # preload units being read, as last heard
        self.preloading = False  # a preload was running at the last reply
        # The last reply brought changes this client had not made or been told of: other
        # processes (or the actor compacting) are changing the map.
        self.changed_elsewhere = True
        self.force_sync = True  # the next miss syncs, however recent the last sync
        self.last_sync = 0.0  # when the actor was asked for the state the map holds
        self.lock = threading.Lock()  # held while a reply is fetched and applied
        self._link = link
        self.reads = ReadCounter(link)  # chunk bytes mapped here, and crossing nodes
        self._pins = pins
        self._counts = counts
        self._ask: tuple | None = None  # (ref, when asked): a sync reply on its way
        self._last_poll = 0.0

    def view(self, cid: int) -> Chunk | None:
        """Return chunk ``cid`` mapped (fetched once), or None if it cannot be."""
        view = self.views.get(cid)
        if view is not None:
            return view
        ref = self.refs.get(cid)
        if ref is None or not self._link.usable():
            return None
        view, lost = fetch_chunk(self._link, ref, self.reads)
        if view is None:
            if lost:
                self._chunk_lost(cid)
            return None
        self.views[cid] = view
        self.changes += 1
        return view

    def view_many(self, cids: list[int]) -> list[Chunk | None]:
        """Return each chunk of ``cids`` mapped (None where it cannot be), fetching together.

        The chunks not mapped yet are fetched ``FETCH_GROUP`` at a time (``fetch_chunks``);
        from a group that fails on, they are fetched one by one, as ``view`` does.
        """
        views = self.views
        missing = [(c, self.refs.get(c)) for c in cids if c not in views]
        missing = [(c, ref) for c, ref in missing if ref is not None]
        for start in range(0, len(missing), FETCH_GROUP):
            group = missing[start : start + FETCH_GROUP]
            if len(group) < 2 or not self._link.usable():
                break
            chunks = fetch_chunks(self._link, [ref for _, ref in group], self.reads)
            if chunks is None:
                break
            for (cid, _), chunk in zip(group, chunks):
                views[cid] = chunk
            self.changes += 1
        return [self.view(c) for c in cids]

    def _chunk_lost(self, cid: int) -> None:
        """Drop chunk ``cid``, lost with its node, and have the directory unmap it.

        The reply holds the loss (a ``LostEvent``), which unmaps its indices here as in
        every other process: their next reads are misses, filled from the provider.
        """
        with self.lock:
            self.refs.pop(cid, None)
            self.views.pop(cid, None)
            self.changes += 1
            asked = time.monotonic()
            reply = self._link.call("chunk_lost", cid, self._link.client_id, self.version)
            if reply is not LOST:
                self.apply(reply, asked)

    def sync_due(self) -> bool:
        """Return True if a miss should ask the actor what changed now."""
        return self.force_sync or time.monotonic() - self.last_sync >= MIN_SYNC_S

    def sync(self, force: bool = False) -> None:
        """Bring the map up to date with the directory actor (rate-limited unless ``force``)."""
        if not self._link.usable():
            return
        with self.lock:
            if force or self.sync_due():
                self._sync_now()

    def poll(self) -> None:
        """Learn what changed without waiting for the actor, where the map is recent.

        Applies the sync reply asked for at the previous call, if it has arrived, and
        asks for the next one (at most every ``MIN_SYNC_S``). Under load a sync round
        trip takes several milliseconds, the time the actor takes to get to it: a
        DataLoader batch that misses while this process fills the cache alone pays that
        only when the map is older than ``STALE_S``, instead of at every batch.
        """
        now = time.monotonic()
        if now - self._last_poll < POLL_S or not self._link.usable():
            return
        with self.lock:
            self._last_poll = now
            if self._ask is not None:
                ref, asked = self._ask
                if ray.wait([ref], timeout=0)[0]:
                    self._ask = None
                    if not self._take_reply(ref, asked):
                        return
            now = time.monotonic()
            if self.force_sync or now - self.last_sync >= STALE_S:
                self._sync_now()
            elif self._ask is None and now - self.last_sync >= MIN_SYNC_S:
                ref = self._ask_sync()
                if ref is not LOST:
                    self._ask = (ref, now)

    def forget_pending_reply(self) -> None:
        """Drop a sync reply still on its way (before the process detaches)."""
        with self.lock:
            self._ask = None

    def _ask_sync(self) -> Any:
        """Send the actor a sync request (this map's version, the counters); its ref."""
        return self._link.submit("sync", self._link.client_id, self.version, *self._counts())

    def _sync_now(self) -> None:
        """Ask the actor for what changed and apply it (the caller holds ``lock``)."""
        self.force_sync = False
        asked = time.monotonic()
        self._take_reply(self._ask_sync(), asked)

    def _take_reply(self, ref: Any, asked: float) -> bool:
        """Get the sync reply ``ref`` (asked for at ``asked``) and apply it; False if lost."""
        reply = self._link.get(ref)
        if reply is LOST:
            return False
        self.apply(reply, asked)
        return True

    def note_units(self, inflight: Inflight | None) -> None:
        """Record the preload units an actor reply listed (None: no preload runs)."""
        self.preloading = inflight is not None
        self.inflight = inflight or {}

    def apply(self, reply: SyncReply, asked: float, news: bool | None = None) -> None:
        """Apply a sync reply (the caller holds ``lock``).

        A reply older than the map (another reply, asked for later, came first) is
        dropped. A newer one repeats the events since the version it was asked for,
        which the map may hold already; applied in order, they leave the same map.

        Parameters
        ----------
        reply : Events or Snapshot
            The reply.
        asked : float
            When it was asked for (``time.monotonic()``).
        news : bool, optional
            Whether it holds changes made elsewhere; None: any change counts.
        """
        if reply.version < self.version:
            return
        self.changed_elsewhere = reply.version > self.version if news is None else news
        self.last_sync = max(self.last_sync, asked)
        if isinstance(reply, Snapshot):
            loc = np.where(
                reply.chunk_of >= 0, pack_locations(reply.chunk_of, reply.row_of), MISSING
            )
            for cid in [c for c in self.refs if c not in reply.refs]:
                self._pins.retire(cid, self.refs[cid], self.views.get(cid))
            self.refs = dict(reply.refs)
            self.views = {c: v for c, v in self.views.items() if c in self.refs}
            self.loc = loc
        else:
            self.refs.update(reply.refs)
            for event in reply.events:
                if type(event) is AddEvent:
                    self.loc[event.indices] = pack_locations(event.cid, event.rows)
                elif type(event) is LostEvent:
                    self.refs.pop(event.cid, None)
                    self.views.pop(event.cid, None)
                    unmap_lost(self.loc, event)
                else:
                    for cid in event.cids:
                        ref = self.refs.pop(cid, None)
                        self._pins.retire(cid, ref, self.views.pop(cid, None))
        if isinstance(reply, Snapshot) or reply.events:
            self.changes += 1
        self.version = reply.version
        self.note_units(reply.inflight)

    def map_all(self) -> dict[int, Chunk]:
        """Map every live chunk; return the mapped chunks (for a fork about to happen)."""
        self.view_many(list(self.refs))
        return self.views

    def after_fork_in_child(self) -> None:
        """Replace the lock, which another thread of the parent may have held at the fork."""
        self.lock = threading.Lock()
