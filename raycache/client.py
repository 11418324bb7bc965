"""One process's connection to a cache: the local map, mapped chunks and write buffer.

Reads never call the directory actor for an item that is in a chunk this process has
already mapped: the map is a local int64 array (chunk id << 32 | row, -1 for missing)
and a mapped chunk is a set of numpy views of shared memory. Only a miss asks the actor
what changed, at most every ``MIN_SYNC_S`` unless this process just inserted.

Inserts are buffered and sent by a background thread in batches (one actor call and
one object per batch instead of per item, ~20x faster per RAY-FACTS), after at most
``flush_interval_s``; the same thread sends heartbeats so the actor knows this client
is alive. An inserted item is copied once, into the columns of the chunk it will be
sent in (``ChunkBuilder``); the buffers are reused once the actor has the chunk.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from raycache.chunk import Chunk, chunk_rows, flatten_checked, flatten_item, leaves_nbytes
from raycache.chunk_builder import ChunkBuilder, ColumnSpares
from raycache.config import CacheConfig
from raycache.directory import CacheDirectory
from raycache.errors import CacheUnavailableError
from raycache.fork_pins import ChildPins
from raycache.protocol import READ_IT, STORED
from raycache.relay import InsertRelay
from raycache.runtime import ensure_ray, in_forked_child
from raycache.values import check_item, copy_item

__all__ = ["CacheClient", "directory_actor"]

logger = logging.getLogger(__name__)

MIN_SYNC_S = 0.05
# A process that inserted this recently, into a cache nobody else changes, is filling
# it alone: a read that may not wait (a DataLoader batch) then trusts its map, learning
# newer changes from a sync reply it asked for at its last miss (see ``poll``). A map
# older than this is brought up to date first.
STALE_S = 1.0
# Least time between two checks for a sync reply by reads that may not wait.
POLL_S = 0.005
# Longest a miss waits for the preload task reading its unit. The task may not even be
# scheduled (trainers holding every CPU): then the trainer reads the unit's items itself.
INFLIGHT_WAIT_S = 5.0
HEARTBEAT_S = 5.0
# Spare items reserved at a time, with the misses of a batch that waits for a unit: about
# what a trainer reads while it waits for one (2 ms reads, units of ~0.02-0.3 s).
SPARE_BLOCK = 8
# A wait that outlasts its block is likely a long one: each further block of the same
# wait is twice as big, up to this, so that a wait costs a few actor calls, not one per
# 8 reads (a call took ~4 ms beside a preload here, two reads' time).
SPARE_BLOCK_MAX = 64
# Items buffered before a flush is sent regardless of flush_interval_s.
FLUSH_BYTES = 8 * 1024 * 1024
# While this process fills the cache alone (``_filling_alone``), nobody else is waiting
# to see its inserts: it sends a chunk's worth at a time, once it has inserted nothing
# for flush_interval_s, or once its oldest buffered item has waited this long. Whole
# chunks need no merging in the actor, whose CPU the trainer loses on two vCPUs: filling
# 2,048 items of 48 KiB on miss (~1 ms of Python each), the actor's CPU per epoch went
# 0.44 -> 0.18 s and the epoch 1.20x -> 1.15x the no-cache epoch (docs/design.md).
ALONE_FLUSH_S = 2.0
# The column buffers of sent segments are kept for the next inserts (fresh memory costs
# a page fault per 4 KiB) while this process inserts; once it has inserted nothing for
# this long they are freed. A fast fill on miss touches up to a chunk's worth of each
# (two 64 MiB columns of 48 KiB items), which warm epochs would otherwise keep resident.
WRITE_IDLE_S = 2.0
_ROW_MASK = np.int64(0xFFFFFFFF)

_Directory = ray.remote(CacheDirectory)
_live_clients: weakref.WeakSet = weakref.WeakSet()


class _Segment:
    """Inserted items waiting in this process, copied into one chunk's columns.

    Parameters
    ----------
    rows : int
        Most items it holds.
    max_bytes : int
        It takes no more items once it holds this many bytes.
    spares : ColumnSpares
        Where its column buffers come from.
    """

    def __init__(self, rows: int, max_bytes: int, spares: ColumnSpares):
        self.builder = ChunkBuilder(rows, spares, private=True)
        self.max_bytes = max_bytes
        self.rows: dict[int, int] = {}  # index -> row
        self.nbytes = 0

    def full(self) -> bool:
        """Return True once it takes no more items."""
        return len(self.rows) >= self.builder.capacity or self.nbytes >= self.max_bytes

    def add(self, idx: int, item: Any, flat: tuple | None = None) -> int:
        """Copy a validated item into the next row; return its size in bytes.

        ``flat`` as for ``ChunkBuilder.add``.
        """
        row = len(self.rows)
        nbytes = self.builder.add(row, item, flat)
        self.rows[idx] = row
        self.nbytes += nbytes
        return nbytes

    def item(self, idx: int) -> Any:
        """Return a private copy of the item buffered for ``idx``."""
        return copy_item(self.builder.row(self.rows[idx]))

    def chunk(self) -> Chunk:
        """Return the chunk of every buffered item (views of the columns, no copy)."""
        indices = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
        return self.builder.build(indices, np.arange(len(self.rows)))


def directory_actor(name: str, namespace: str, spec: dict | None = None) -> Any:
    """Return the directory actor of cache ``name``, creating it when ``spec`` is given.

    Creation is get-or-create (``get_if_exists``), so processes racing to attach end up
    with one actor. It is ``lifetime="detached"`` so it does not die with the job that
    happened to create it; the actor frees itself (see ``CacheDirectory._reap``).

    Parameters
    ----------
    name : str
        The cache name.
    namespace : str
        The Ray namespace.
    spec : dict, optional
        Creation arguments; None only looks the actor up.

    Returns
    -------
    ray.actor.ActorHandle
        The handle.

    Raises
    ------
    ValueError
        If ``spec`` is None and no such cache exists.
    """
    if spec is None:
        return ray.get_actor(f"raycache:{name}", namespace=namespace)
    return _Directory.options(
        name=f"raycache:{name}",
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        # Trainers block a thread each in wait_cached; preload tasks' claims need one.
        max_concurrency=64,
        num_cpus=0,
        max_restarts=0,
    ).remote(spec)


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
    """

    def __init__(self, config: CacheConfig, name: str, length: int, fingerprint: str):
        ensure_ray(config.address)
        self.config = config
        self.name = name
        self.length = length
        self.pid = os.getpid()
        self.client_id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.timeout = float(config.timeout_s)
        spec = {
            "name": name,
            "length": length,
            "fingerprint": fingerprint,
            "chunk_size": config.chunk_size,
            "chunk_bytes": config.chunk_bytes,
            "max_bytes": config.max_bytes,
            "detached": config.detached,
            "linger_s": config.linger_s,
            "log_dir": config.log_dir,
        }
        info = {"host": socket.gethostname(), "pid": self.pid}
        self.settings = self._attach(spec, info)
        self._loc = np.full(length, -1, dtype=np.int64)
        self._version = 0
        self._refs: dict[int, Any] = {}
        self._views: dict[int, Chunk] = {}
        self._inflight: dict[int, int] = {}  # preload unit being read: start -> stop
        self._preloading = False  # a preload was running at the last sync
        self._stalled: set[int] = set()  # units whose preload reader did not end in time
        self._spare_block: list[int] = []  # spare items reserved for this process
        self._spare_refills = 0  # blocks asked for since the wait began
        self._last_sync = 0.0  # when the actor was asked for the state the map holds
        self._force_sync = True
        self._sync_ask: tuple | None = None  # (ref, when asked): a sync reply on its way
        self._last_poll = 0.0
        self._last_put = -STALE_S  # when this process last buffered an insert
        # The last sync brought changes this client had not made or been told of: other
        # processes (or the actor compacting) are changing the map.
        self._changed_elsewhere = True
        self._sync_lock = threading.Lock()
        self._pending: dict[int, _Segment] = {}  # index -> the segment that holds it
        self._segments: list[_Segment] = []  # waiting to be sent; the last one fills
        self._outgoing: dict[int, _Segment] = {}  # the batch being sent, until mapped
        self._spares = ColumnSpares()
        self._pending_bytes = 0
        self._first_pending = 0.0
        self._flush_requested = False
        self._sending = False
        self._cond = threading.Condition()
        self._sent_hits = self._sent_misses = 0
        self.hits = 0
        self.misses = 0
        self.dead = False
        self.closed = False
        self.forked = False
        self._warned_fork = False
        self._relay: InsertRelay | None = None  # made at the first fork (see prepare_fork)
        self._pins = ChildPins()  # retired chunks that forked children may still read
        self._chunk_bytes = int(self.settings["chunk_bytes"])
        self.sync(force=True)
        self._thread = threading.Thread(target=self._flush_loop, name="raycache-flush", daemon=True)
        self._thread.start()
        _live_clients.add(self)
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def _attach(self, spec: dict, info: dict) -> dict:
        # The actor may be freeing itself (linger expired) at this moment: try again,
        # and a fresh actor is created under the same name.
        for attempt in range(3):
            self.actor = directory_actor(self.name, self.config.namespace, spec)
            try:
                return ray.get(
                    self.actor.attach.remote(self.client_id, info, spec), timeout=self.timeout
                )
            except RayActorError:
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ reads
    def get(
        self,
        idx: int,
        copy: bool = True,
        wait: bool = True,
        meanwhile: Callable[[], bool] | None = None,
    ) -> Any:
        """Return the cached item ``idx`` or None (idx already validated).

        With ``wait``, a miss on an index a preload task is reading waits for its unit
        (see ``_refresh``, and ``meanwhile`` there); without, it returns None at once,
        and while this process fills the cache alone it does not wait for the actor's
        answer either.
        """
        item = self._read_mapped(idx, copy)
        if item is not None:
            return item
        if idx in self._pending or idx in self._outgoing:
            # Under the lock: a segment's buffers are reused once it has been sent.
            with self._cond:
                segment = self._pending.get(idx) or self._outgoing.get(idx)
                if segment is not None:
                    return segment.item(idx)
        if self._refresh(idx, wait, meanwhile):
            return self._read_mapped(idx, copy)
        return None

    def being_preloaded(self, indices: np.ndarray, spares: bool = False) -> np.ndarray:
        """Return, per index, whether a preload unit this client may wait for holds it.

        While a preload runs, the actor is asked, and the misses no unit holds are
        reserved for this process, which reads them: the preload's units leave them out
        (``raycache.reservations``). With ``spares``, a batch that will wait for a unit
        also gets a block of spare items to read meanwhile (``spare_index``). A forked
        child, which makes no Ray call, goes by the units it knew of at the fork.
        """
        if self._preloading and self._usable():
            block = SPARE_BLOCK if spares and not self._spare_block else 0
            held, picked = self._reserve(indices, block)
            self._spare_block += picked.tolist()
            return held
        held = np.zeros(len(indices), dtype=bool)
        for start, stop in list(self._inflight.items()):
            if start not in self._stalled:
                held |= (indices >= start) & (indices < stop)
        return held

    def _read_mapped(self, idx: int, copy: bool) -> Any:
        loc = int(self._loc[idx])
        if loc < 0:
            return None
        view = self._view(loc >> 32)
        if view is None:
            return None
        return view.row(loc & 0xFFFFFFFF, copy)

    def _view(self, cid: int) -> Chunk | None:
        view = self._views.get(cid)
        if view is not None:
            return view
        ref = self._refs.get(cid)
        if ref is None or not self._usable():
            return None
        try:
            view = ray.get(ref, timeout=self.timeout)
        except Exception as exc:
            self._lost(exc)
            return None
        self._views[cid] = view
        return view

    def locate(self, indices: np.ndarray, wait: bool = True) -> np.ndarray:
        """Return ``chunk << 32 | row`` for each index (-1 where missing), syncing once.

        ``wait`` as for ``get``.
        """
        loc = self._loc[indices]
        if (loc < 0).any() and self._refresh(int(indices[np.argmin(loc)]), wait):
            loc = self._loc[indices]
        return loc

    def mapped(self, cids: Any) -> dict[int, Chunk] | None:
        """Return the mapped chunk of each chunk id, or None if one cannot be mapped."""
        views = self._views
        try:
            return {c: views[c] for c in cids}
        except KeyError:
            chunks = {c: self._view(c) for c in cids}
            return None if any(v is None for v in chunks.values()) else chunks

    def views(self, cids: np.ndarray) -> list[Chunk | None]:
        """Return the mapped chunk for each chunk id (None where it cannot be mapped)."""
        return [self._view(int(c)) for c in cids]

    def _refresh(
        self, idx: int, wait: bool = True, meanwhile: Callable[[], bool] | None = None
    ) -> bool:
        """After a miss: learn what changed (rate-limited); True if ``idx`` is now cached.

        With ``wait``, an index that a preload unit is being read for is waited for
        (calling ``meanwhile`` until it returns False, if given).
        Without, it is not; and while this process fills the cache alone, the client
        does not wait for the actor's answer either (see ``poll``).
        """
        if self.dead or self.forked:
            return False
        if not wait and self._filling_alone():
            self.poll()
            return self._loc[idx] >= 0
        if self._force_sync or time.monotonic() - self._last_sync >= MIN_SYNC_S:
            self.sync()
            if self._loc[idx] >= 0:
                return True
        if not wait:
            return False
        return self._await_unit(idx, meanwhile)

    def _unit_of(self, idx: int) -> int | None:
        """Return the first index of the preload unit reading ``idx`` (as last heard)."""
        return next((a for a, b in self._inflight.items() if a <= idx < b), None)

    def _await_unit(self, idx: int, meanwhile: Callable[[], bool] | None) -> bool:
        """Wait for the preload unit reading ``idx``; True if ``idx`` is cached then.

        ``meanwhile`` is called again and again while the unit is not done, as long as
        it returns True (it reads an item the preload has not reached).
        """
        # A preload reader is reading idx (as of the last sync, which may be a moment
        # old): wait for it instead of reading it too.
        unit = self._unit_of(idx)
        if unit is None or unit in self._stalled:
            return False
        patience = min(self.timeout, INFLIGHT_WAIT_S)
        asked = time.monotonic()
        try:
            ref = self.actor.wait_cached.remote(idx, patience, self.client_id, self._version)
        except Exception as exc:
            self._lost(exc)
            return False
        # meanwhile's own errors (the provider's) are its caller's, not the cache's.
        try:
            while meanwhile is not None and not self._unit_done(ref) and meanwhile():
                pass
        finally:
            self.release_spares()
        if not self._unit_done(ref):
            # Nothing left to read here while the unit is read: a good moment to send what
            # this process inserted (the preload waits for reserved items to be stored).
            self._send_soon()
        try:
            reply = ray.get(ref, timeout=patience + self.timeout)
        except Exception as exc:
            self._lost(exc)
            return False
        if reply is None:
            self._stalled.add(unit)
            return False
        with self._sync_lock:  # the map's news up to idx's unit: no sync of its own
            self._apply(reply, asked)
        return self._loc[idx] >= 0

    def _unit_done(self, ref: Any) -> bool:
        """Return True once the actor has answered a ``wait_cached`` call (``ref``)."""
        try:
            return bool(ray.wait([ref], timeout=0)[0])
        except Exception:  # the ray.get after it reports what went wrong
            return True

    def spare_index(self) -> int | None:
        """Return an index reserved for this process to read while it waits, or None.

        The actor hands out spare items from the top of the indices no preload unit has
        reached (the preload reaches them last) and reserves them for this process, so
        neither the preload nor another trainer reads them too. They come in blocks of
        ``SPARE_BLOCK``, with the misses of a batch that waits (``being_preloaded``), or
        here when the block is used up; ``release_spares`` gives back the rest.

        Returns
        -------
        int or None
            The index, or None when no preload is running or none is left.
        """
        while self._usable():
            while self._spare_block:
                idx = self._spare_block.pop(0)
                if self._loc[idx] < 0 and idx not in self._pending and idx not in self._outgoing:
                    return idx
            if not self._preloading:
                return None
            self._spare_refills += 1
            count = min(SPARE_BLOCK << self._spare_refills, SPARE_BLOCK_MAX)
            _, picked = self._reserve(np.zeros(0, dtype=np.int64), count)
            if not len(picked):
                return None
            self._spare_block = picked.tolist()
        return None

    def _reserve(self, indices: np.ndarray, spares: int) -> tuple[np.ndarray, np.ndarray]:
        """Ask the actor to reserve ``indices`` and ``spares`` (``CacheDirectory.reserve``).

        Returns, per index, whether to wait for it instead of reading it (a unit holds
        it, or it was stored since the last sync, which the next miss then forces),
        and the spares reserved.
        """
        try:
            reply = self.actor.reserve.remote(self.client_id, indices, spares)
            state, picked, inflight = ray.get(reply, timeout=self.timeout)
        except Exception as exc:
            self._lost(exc)
            return np.zeros(len(indices), dtype=bool), np.zeros(0, dtype=np.int64)
        self._preloading = inflight is not None
        self._inflight = inflight or {}
        if (state == STORED).any():
            self._force_sync = True
        return state != READ_IT, picked

    def release_spares(self) -> None:
        """Give back the spare items reserved for this process and not read yet."""
        block, self._spare_block = self._spare_block, []
        self._spare_refills = 0
        if block:
            self.release_reserved(block)

    def release_reserved(self, indices: list[int]) -> None:
        """Tell the actor this process will not read ``indices``: the preload reads them."""
        if not (self._preloading and self._usable()):
            return
        try:
            self.actor.release_reserved.remote(self.client_id, np.asarray(indices, np.int64))
        except Exception as exc:
            self._lost(exc)

    def _usable(self) -> bool:
        """Return True if this client may call Ray now.

        After ``ray.shutdown()`` any Ray call would silently start a new local Ray, so a
        client that finds Ray gone marks itself dead instead.
        """
        if self.dead or self.forked:
            return False
        if not ray.is_initialized():
            self.dead = True
            return False
        return True

    def sync(self, force: bool = False) -> None:
        """Bring the local map up to date with the directory actor."""
        if not self._usable():
            return
        with self._sync_lock:
            if (
                not force
                and not self._force_sync
                and time.monotonic() - self._last_sync < MIN_SYNC_S
            ):
                return
            self._sync_now()

    def _filling_alone(self) -> bool:
        """Return True while this process inserts and the map changes only through it.

        Then a miss is almost surely an item nobody has stored, and waiting for the
        actor to say so is wasted; at any other time (other trainers inserting, a
        preload running, warm epochs) a miss asks and waits, so items stored elsewhere
        are never read again. While a preload runs, this process's inserts are also
        what the preload waits for at its end (``raycache.reservations``): they are
        sent every ``flush_interval_s``, not a chunk's worth at a time.
        """
        alone = not self._changed_elsewhere and not self._preloading
        return alone and time.monotonic() - self._last_put < STALE_S

    def poll(self) -> None:
        """Learn what changed without waiting for the actor, where the map is recent.

        Applies the sync reply asked for at the previous call, if it has arrived, and
        asks for the next one (at most every ``MIN_SYNC_S``). Under load a sync round
        trip takes several milliseconds, the time the actor takes to get to it: a
        DataLoader batch that misses while this process fills the cache alone pays that
        only when the map is older than ``STALE_S``, instead of at every batch.
        """
        now = time.monotonic()
        if now - self._last_poll < POLL_S or not self._usable():
            return
        with self._sync_lock:
            self._last_poll = now
            if self._sync_ask is not None:
                ref, asked = self._sync_ask
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    self._sync_ask = None
                    if not self._take_reply(ref, asked):
                        return
            now = time.monotonic()
            if self._force_sync or now - self._last_sync >= STALE_S:
                self._sync_now()
            elif self._sync_ask is None and now - self._last_sync >= MIN_SYNC_S:
                try:
                    ref = self._ask_sync()
                except Exception as exc:
                    self._lost(exc)
                    return
                self._sync_ask = (ref, now)

    def _ask_sync(self) -> Any:
        """Send the actor a sync request (this map's version, the counters); its ref."""
        hits, misses = self._counter_deltas()
        return self.actor.sync.remote(self.client_id, self._version, hits, misses)

    def _sync_now(self) -> None:
        """Ask the actor for what changed and apply it (the caller holds ``_sync_lock``)."""
        self._force_sync = False
        asked = time.monotonic()
        try:
            ref = self._ask_sync()
        except Exception as exc:
            self._lost(exc)
            return
        self._take_reply(ref, asked)

    def _take_reply(self, ref: Any, asked: float) -> bool:
        """Get the sync reply ``ref`` (asked for at ``asked``) and apply it; False if lost."""
        try:
            reply = ray.get(ref, timeout=self.timeout)
        except Exception as exc:
            self._lost(exc)
            return False
        self._apply(reply, asked)
        return True

    def _apply(self, reply: tuple, asked: float, news: bool | None = None) -> None:
        """Apply a ``CacheDirectory.sync`` reply (the caller holds ``_sync_lock``).

        A reply older than the map (another reply, asked for later, came first) is
        dropped. A newer one repeats the events since the version it was asked for,
        which the map may hold already; applied in order, they leave the same map.
        ``news``: whether it holds changes made elsewhere (None: any change).
        """
        if reply[1] < self._version:
            return
        self._changed_elsewhere = reply[1] > self._version if news is None else news
        self._last_sync = max(self._last_sync, asked)
        if reply[0] == "snapshot":
            _, version, chunk_of, row_of, refs, inflight = reply
            loc = np.where(
                chunk_of >= 0, (chunk_of.astype(np.int64) << 32) | row_of.astype(np.int64), -1
            )
            for cid in [c for c in self._refs if c not in refs]:
                self._pins.retire(cid, self._refs[cid], self._views.get(cid))
            self._refs = dict(refs)
            self._views = {c: v for c, v in self._views.items() if c in self._refs}
            self._loc = loc
        else:
            _, version, events, refs, inflight = reply
            self._refs.update(refs)
            for event in events:
                if event[0] == "add":
                    _, cid, idx, rows = event
                    self._loc[idx] = (np.int64(cid) << 32) | rows.astype(np.int64)
                else:
                    for cid in event[1]:
                        ref = self._refs.pop(cid, None)
                        self._pins.retire(cid, ref, self._views.pop(cid, None))
        self._version = version
        self._preloading = inflight is not None
        self._inflight = inflight or {}

    def prepare_fork(self) -> None:
        """Send buffered items, catch up and map every chunk, for children forked next.

        Skipped when this thread is inside a sync already (a fork from within raycache's
        own calls, such as Ray starting a process), so the hook can never deadlock.
        """
        if not self._sync_lock.acquire(blocking=False):
            return
        self._sync_lock.release()
        self.flush()
        self.sync(force=True)
        for cid in list(self._refs):
            self._view(cid)
        self._pins.preparing(self._views)  # what the child can read, kept while it lives
        # The child cannot call Ray: it sends what it reads to this process instead.
        if self._relay is None:
            self._relay = InsertRelay(self._buffer, self.name, on_exit=self._pins.exited)
        self._relay.before_fork()

    def after_fork_in_parent(self) -> None:
        """Start reading the inserts of the child just forked; keep what it can read."""
        child = self._relay.after_fork_in_parent() if self._relay is not None else None
        self._pins.forked(child)

    # ------------------------------------------------------------------ writes
    def put(self, idx: int, item: Any) -> None:
        """Buffer ``item`` (validated and copied) for index ``idx``."""
        if self.forked:
            self._put_from_child(idx, item)
            return
        leaves: list = []
        template = flatten_checked(item, leaves)  # a bad item fails here
        if self.dead or self.closed:
            return
        self._buffer(idx, item, (template, leaves))

    def _put_from_child(self, idx: int, item: Any) -> None:
        check_item(item)  # a bad item fails here, as in the parent; pickling copies it
        if self._relay is not None and self._relay.send(idx, item):
            return
        if not self._warned_fork:
            self._warned_fork = True
            logger.warning(
                "raycache %s: this forked process cannot insert into the cache (Ray is not "
                "fork-safe) and has no pipe to its parent; misses here are read from the "
                "provider and not cached. Preload the cache, or use "
                "multiprocessing_context='spawn'.",
                self.name,
            )

    def _buffer(self, idx: int, item: Any, flat: tuple | None = None) -> None:
        """Copy a validated item into the next flush's chunk (parent side).

        ``flat``: the item's ``(template, leaves)`` (see ``chunk.flatten_checked``),
        where the caller has them (the relay of forked workers' inserts does not).
        """
        if self.dead or self.closed or self._loc[idx] >= 0:
            return  # cached already; the first value wins, as in the actor
        if flat is None:
            leaves: list = []
            flat = (flatten_item(item, leaves), leaves)
        self._last_put = time.monotonic()
        with self._cond:
            if idx in self._pending:
                return
            if not self._pending:
                self._first_pending = time.monotonic()
                # The flush thread sleeps until the next heartbeat while nothing waits:
                # wake it to send within flush_interval_s (it slept up to 5 s before).
                self._cond.notify_all()
            if not self._segments or self._segments[-1].full():
                # A segment is sent as one chunk: no stored object holds more than a
                # chunk's worth of items. Its columns are touched only as they fill.
                size = leaves_nbytes(flat[1])
                rows = chunk_rows(self.settings["chunk_size"], self._chunk_bytes, size)
                self._segments.append(_Segment(rows, self._chunk_bytes, self._spares))
            segment = self._segments[-1]
            nbytes = segment.add(idx, item, flat)
            self._pending_bytes += nbytes
            self._pending[idx] = segment
            # Wake the flush thread when a limit is crossed, not at every item after it
            # (filling alone, 8 MiB buffered is not a reason to send).
            crossed = self._pending_bytes >= FLUSH_BYTES > self._pending_bytes - nbytes
            if crossed or segment.full():
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send buffered items now; True when the buffer is empty within ``timeout``."""
        if self.forked or self.dead:
            return not self._pending
        if self._relay is not None:
            self._relay.drain()  # what forked workers have sent so far
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            if not self._pending and not self._sending:
                return True
            self._flush_requested = True
            self._cond.notify_all()
            while self._pending or self._sending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return not self._pending
                self._cond.wait(left)
        return True

    def _send_soon(self) -> None:
        """Have the flush thread send the buffered items now, without waiting for it."""
        with self._cond:
            if self._pending:
                self._flush_requested = True
                self._cond.notify_all()

    def _due(self, now: float) -> bool:
        """Return True when the buffered items are to be sent now (``_cond`` held)."""
        if not self._pending:
            return False
        if (
            self._flush_requested
            or self.closed
            or len(self._segments) > 1
            or self._segments[-1].full()
        ):
            return True
        return self._send_wait(now) <= 0

    def _send_wait(self, now: float) -> float:
        """Return how long the buffered items may still wait before they are sent.

        A process filling the cache alone sends a chunk's worth at a time (see
        ``ALONE_FLUSH_S``); otherwise items wait at most ``flush_interval_s`` and 8 MiB.
        """
        interval = self.config.flush_interval_s
        if self._filling_alone():
            return min(
                interval - (now - self._last_put), ALONE_FLUSH_S - (now - self._first_pending)
            )
        if self._pending_bytes >= FLUSH_BYTES:
            return 0.0
        return interval - (now - self._first_pending)

    def _flush_loop(self) -> None:
        last_beat = time.monotonic()
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._due(now) or self._flush_requested or self.closed:
                        break
                    if now - last_beat >= HEARTBEAT_S or self._done_writing(now):
                        break
                    wait = HEARTBEAT_S - (now - last_beat)
                    if self._pending:
                        wait = min(wait, self._send_wait(now))
                    elif self._spares:
                        wait = min(wait, WRITE_IDLE_S - (now - self._last_put))
                    self._cond.wait(max(0.001, wait))
                release = self._done_writing(now)
                batch = self._segments if self._due(now) else []
                if batch:
                    self._outgoing = self._pending
                    self._pending = {}
                    self._segments = []
                    self._pending_bytes = 0
                    self._sending = True
                stop = self.closed and not batch
            if not ray.is_initialized():
                # Ray was shut down under this client; a remote call now would start a
                # new local Ray (Ray initialises itself on .remote()). Stop instead.
                self.dead = True
                with self._cond:
                    self._pending = {}
                    self._segments = []
                    self._sending = False
                    self._cond.notify_all()
                return
            if release:
                self._spares.release()
            if batch:
                self._send(batch)
            elif not stop and not self.dead and not release:
                hits, misses = self._counter_deltas()
                try:
                    self.actor.touch.remote(self.client_id, hits, misses)
                except Exception as exc:
                    self._lost(exc)
                last_beat = time.monotonic()
            with self._cond:
                self._sending = False
                self._outgoing = {}
                # Sent (or lost): their buffers can take new items. Nothing else may keep
                # the segments, or releasing the spares would not free their columns.
                self._spares.give([b for segment in batch for b in segment.builder.buffers])
                batch = []
                if not self._pending:
                    self._flush_requested = False
                self._cond.notify_all()
            if stop or (self.closed and not self._pending):
                return

    def _done_writing(self, now: float) -> bool:
        """Return True when the write buffers kept for inserts are no longer worth keeping.

        That is once nothing waits to be sent and this process has inserted nothing for
        ``WRITE_IDLE_S`` (the caller holds ``_cond``).
        """
        return (
            not self._pending
            and not self._sending
            and now - self._last_put >= WRITE_IDLE_S
            and bool(self._spares)
        )

    def _send(self, batch: list[_Segment]) -> None:
        if self.dead:
            return
        start = time.monotonic()
        try:
            chunks = [segment.chunk() for segment in batch]
            reply = ray.get(
                self.actor.insert.remote(chunks, self.client_id, self._version),
                timeout=self.timeout,
            )
        except Exception as exc:
            self._lost(exc)
            lost = sum(len(segment.rows) for segment in batch)
            logger.warning("raycache %s: %d inserted items were not cached", self.name, lost)
            return
        # The reply holds the map's changes since the version sent, these items'
        # places among them: applying it here spares the trainer's next miss a sync of
        # its own (a round trip to an actor that is busy storing).
        # Events this insert did not make came from elsewhere (a snapshot may hold any).
        sync = reply["sync"]
        foreign = sync[0] != "events" or len(sync[2]) > reply["events"]
        with self._sync_lock:
            self._apply(sync, start, news=foreign)
        self.flush_seconds = time.monotonic() - start

    def _counter_deltas(self) -> tuple[int, int]:
        hits, misses = self.hits - self._sent_hits, self.misses - self._sent_misses
        self._sent_hits += hits
        self._sent_misses += misses
        return hits, misses

    # ------------------------------------------------------------------ state
    def _lost(self, exc: BaseException) -> None:
        """Record that the cache cannot be used any more, once, and say so."""
        if isinstance(exc, GetTimeoutError):
            logger.warning("raycache %s: call timed out after %.1fs", self.name, self.timeout)
        if self.dead:
            return
        self.dead = True
        logger.warning(
            "raycache %s: cache unavailable (%s: %s); reading from the provider from now on",
            self.name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )

    def stats(self) -> dict:
        """Return the directory's counters plus this client's own."""
        if self.dead or self.forked:
            raise CacheUnavailableError(f"cache {self.name!r} is unavailable in this process")
        self.flush()
        hits, misses = self._counter_deltas()
        self.actor.touch.remote(self.client_id, hits, misses)
        out = ray.get(self.actor.stats.remote(), timeout=self.timeout)
        out["client"] = {"hits": self.hits, "misses": self.misses, "pending": len(self._pending)}
        return out

    def close(self) -> None:
        """Send buffered items, stop the background thread and detach from the cache."""
        if self.closed or os.getpid() != self.pid:
            return
        if not self.forked and not self.dead:
            self.flush()
        if self._relay is not None:
            self._relay.close()
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.timeout)
        if not self.forked and not self.dead and ray.is_initialized():
            with self._sync_lock:
                self._sync_ask = None  # let Ray forget the pending reply while it is up
            hits, misses = self._counter_deltas()
            try:
                ray.get(
                    self.actor.detach.remote(self.client_id, hits, misses), timeout=self.timeout
                )
            except Exception as exc:
                logger.debug("raycache %s: detach failed: %s", self.name, exc)
        _live_clients.discard(self)

    def after_fork_in_child(self) -> None:
        """Become a read-only client: serve mapped chunks, make no Ray call."""
        self.forked = True
        self._cond = threading.Condition()
        self._sync_lock = threading.Lock()
        self._pending = {}
        self._segments = []
        self._outgoing = {}
        self._spares = ColumnSpares()
        if self._relay is not None:
            self._relay.after_fork_in_child()


def _before_fork() -> None:
    # Children forked from here can read only what is mapped now: flush, catch up and
    # map every chunk first. The parent keeps the refs, which keeps the objects alive.
    for client in list(_live_clients):
        if client.pid != os.getpid() or client.closed or client.dead or in_forked_child():
            continue
        try:
            client.prepare_fork()
        except Exception:  # a failed preparation must not break the fork
            logger.exception("raycache: preparing cache %s for fork failed", client.name)


def _after_fork_in_parent() -> None:
    for client in list(_live_clients):
        if client.pid == os.getpid():
            client.after_fork_in_parent()


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client.after_fork_in_child()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
