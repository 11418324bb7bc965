"""A process's inserts, buffered and sent to the directory actor by one background thread.

Inserts are sent in batches: one actor call and one object per batch instead of per
item, ~20x faster per item (``docs/design.md``). An inserted item is copied once, into
the columns of the chunk it will be sent in (``ChunkBuilder``); on the actor's node
those columns are shared memory the actor reads them from (``client.staging``). The
column buffers are reused once the actor has the chunk, and freed once this process
stops inserting.

The thread does one job at a time (``_next_job``): send the buffered batch when it is
due, free the kept column buffers once inserts have stopped for ``WRITE_IDLE_S``, or
send a heartbeat every ``HEARTBEAT_S`` so that the actor knows this client is alive.
It stops when the buffer is closed and nothing is left to send, or when Ray is gone.

Guarantees: an index is buffered once (the first value wins, as in the actor); a
buffered item can be read back until the actor's reply to its batch has been applied;
a batch is at most one chunk's worth of items per segment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk, chunk_rows, leaves_nbytes
from raycache.chunk_builder import ChunkBuilder, ColumnSpares
from raycache.client.link import LOST, ActorLink
from raycache.client.local_map import LocalMap
from raycache.client.staging import InsertSender
from raycache.values import copy_item

__all__ = [
    "ALONE_FLUSH_S",
    "FLUSH_BYTES",
    "HEARTBEAT_S",
    "WRITE_IDLE_S",
    "Segment",
    "WriteBuffer",
]

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
# Items buffered before a flush is sent regardless of flush_interval_s.
FLUSH_BYTES = 8 * 1024 * 1024
# While this process fills the cache alone, nobody else is waiting to see its inserts:
# it sends a chunk's worth at a time, once it has inserted nothing for
# flush_interval_s, or once its oldest buffered item has waited this long. Whole chunks
# need no merging in the actor, whose CPU the trainer loses on two vCPUs (filling on
# miss, the actor's CPU per epoch fell by more than half: docs/design.md).
ALONE_FLUSH_S = 2.0
# The column buffers of sent segments are kept for the next inserts (fresh memory costs
# a page fault per 4 KiB) while this process inserts; once it has inserted nothing for
# this long they are freed. A fast fill on miss touches up to a chunk's worth of each
# (``client.staging.SPARE_BUFFERS`` 64 MiB columns of 48 KiB items), which warm epochs
# would otherwise keep resident.
WRITE_IDLE_S = 2.0

_STOP, _RELEASE, _BEAT = "stop", "release", "beat"


class Segment:
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

    def add(self, idx: int, item: Any, flat: tuple) -> int:
        """Copy a validated item into the next row; return its size in bytes.

        ``flat`` as for ``ChunkBuilder.add``.
        """
        row = len(self.rows)
        nbytes = self.builder.add(row, item, flat)
        self.rows[idx] = row
        self.nbytes += nbytes
        return nbytes

    def room(self, item_bytes: int) -> int:
        """Return how many more items of ``item_bytes`` it takes (at least 1 unless full)."""
        rows = self.builder.capacity - len(self.rows)
        # As ``add``: items are taken while fewer than ``max_bytes`` are held.
        by_bytes = -(-(self.max_bytes - self.nbytes) // max(1, item_bytes))
        return max(0, min(rows, by_bytes))

    def add_many(self, indices: list, items: list, flats: list) -> int:
        """Copy validated items of one layout into the next rows; return their bytes.

        ``flats`` as for ``ChunkBuilder.add_rows``; at most ``room`` items.
        """
        row = len(self.rows)
        nbytes = self.builder.add_rows(row, items, flats)
        self.rows.update(zip(indices, range(row, row + len(indices))))
        self.nbytes += nbytes
        return nbytes

    def item(self, idx: int) -> Any:
        """Return a private copy of the item buffered for ``idx``."""
        return copy_item(self.builder.row(self.rows[idx]))

    def chunk(self) -> Chunk:
        """Return the chunk of every buffered item (views of the columns, no copy)."""
        indices = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
        return self.builder.build(indices, np.arange(len(self.rows)))


class WriteBuffer:
    """Buffered inserts and the thread that sends them.

    Parameters
    ----------
    link : ActorLink
        The line to the directory actor.
    local_map : LocalMap
        The map, which each insert's reply brings up to date.
    settings : Any
        The cache's settings (its ``chunk_size`` and ``chunk_bytes``).
    config : CacheConfig
        Its ``flush_interval_s``: the longest an item waits, unless filling alone.
    counts : Callable[[], tuple[int, int]]
        Returns the hits and misses to report with a heartbeat.
    alone : Callable[[], bool]
        Whether this process fills the cache alone (see ``ALONE_FLUSH_S``).
    """

    def __init__(
        self,
        link: ActorLink,
        local_map: LocalMap,
        settings: Any,
        config: Any,
        counts: Callable[[], tuple[int, int]],
        alone: Callable[[], bool],
    ):
        self._link, self._map = link, local_map
        self._chunk_size, self._chunk_bytes = settings.chunk_size, settings.chunk_bytes
        self._interval = config.flush_interval_s
        self._counts, self._alone = counts, alone
        self.inserts = InsertSender(link)  # the actor's call, its buffers (``client.staging``)
        self.last_put = -WRITE_IDLE_S  # when an item was last buffered
        self.closed = False
        self._cond = threading.Condition()
        self._pending: dict[int, Segment] = {}  # index -> the segment that holds it
        self._segments: list[Segment] = []  # waiting to be sent; the last one fills
        self._outgoing: dict[int, Segment] = {}  # the batch being sent, until applied
        self._pending_bytes = 0
        self._first_pending = 0.0
        self._flush_requested = False
        self._sending = False
        self._thread = threading.Thread(target=self._run, name="raycache-flush", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side
    def __len__(self) -> int:
        """Return the number of items waiting to be sent."""
        return len(self._pending)

    spares = property(lambda self: self.inserts.spares, doc="Column buffers kept for inserts.")

    def holds(self, idx: int) -> bool:
        """Return True if ``idx`` is buffered here or being sent."""
        return idx in self._pending or idx in self._outgoing

    def item(self, idx: int) -> Any:
        """Return a private copy of buffered item ``idx``, or None."""
        # Under the lock: a segment's buffers are reused once it has been sent.
        with self._cond:
            segment = self._pending.get(idx) or self._outgoing.get(idx)
            return None if segment is None else segment.item(idx)

    def add(self, idx: int, item: Any, flat: tuple) -> None:
        """Copy a validated item into the next batch's chunk (unless ``idx`` is buffered).

        ``flat``: the item's ``(template, leaves)`` (see ``chunk.flatten_checked``).
        """
        self.last_put = time.monotonic()
        with self._cond:
            if idx in self._pending:
                return
            if not self._pending:
                self._first_pending = time.monotonic()
                # The thread sleeps until the next heartbeat while nothing waits: wake
                # it to send within flush_interval_s.
                self._cond.notify_all()
            segment = self._open_segment(leaves_nbytes(flat[1]))
            if self._added([idx], segment, segment.add(idx, item, flat)):
                self._cond.notify_all()

    def add_many(self, indices: list, items: list, flats: list, uniform: bool) -> None:
        """Copy validated items into the next batches' chunks, one copy per field.

        As ``add`` for each item (an index buffered already, or earlier in the batch,
        keeps its first value). ``uniform``: the items share one layout (see
        ``client.batch_put.flatten_batch``); else they are added one by one.
        """
        if not uniform:
            for idx, item, flat in zip(indices, items, flats):
                self.add(idx, item, flat)
            return
        self.last_put = time.monotonic()
        item_bytes = leaves_nbytes(flats[0][1])
        with self._cond:
            first: dict[int, int] = {}  # index -> its first position in the batch
            for k, i in enumerate(indices):
                if i not in self._pending:
                    first.setdefault(i, k)
            keep = list(first.values())
            if not keep:
                return
            wake = not self._pending
            if wake:
                self._first_pending = time.monotonic()
            while keep:
                segment = self._open_segment(item_bytes)
                room = segment.room(item_bytes)
                part, keep = keep[:room], keep[room:]
                taken = [indices[k] for k in part]
                nbytes = segment.add_many(taken, [items[k] for k in part], [flats[k] for k in part])
                wake = self._added(taken, segment, nbytes) or wake
            if wake:
                self._cond.notify_all()

    def _open_segment(self, item_bytes: int) -> Segment:
        """Return the segment for the next items; one is sent as one chunk (``_cond`` held)."""
        if not self._segments or self._segments[-1].full():
            rows = chunk_rows(self._chunk_size, self._chunk_bytes, item_bytes)
            self._segments.append(Segment(rows, self._chunk_bytes, self.spares))
        return self._segments[-1]

    def _added(self, taken: list, segment: Segment, nbytes: int) -> bool:
        """Record items copied into ``segment``; True if the thread is to be woken.

        When a limit is crossed (not at every item after it: filling alone, 8 MiB
        buffered is no reason to send) or the segment is full.
        """
        self._pending.update(dict.fromkeys(taken, segment))
        self._pending_bytes += nbytes
        crossed = self._pending_bytes >= FLUSH_BYTES > self._pending_bytes - nbytes
        return crossed or segment.full()

    def flush(self, timeout: float) -> bool:
        """Send buffered items now; True when the buffer is empty within ``timeout``."""
        if self._link.forked or self._link.dead:
            return not self._pending
        deadline = time.monotonic() + timeout
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

    def send_soon(self) -> None:
        """Have the thread send the buffered items now, without waiting for it."""
        with self._cond:
            if self._pending:
                self._flush_requested = True
                self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Stop the thread once it has sent what is buffered (waits up to ``timeout``)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout)

    def after_fork_in_child(self) -> None:
        """Start empty: the parent's buffers and lock are the parent's (no thread here)."""
        self._cond = threading.Condition()
        self._pending = {}
        self._segments = []
        self._outgoing = {}
        self.inserts.after_fork_in_child()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        last_beat = time.monotonic()
        while True:
            with self._cond:
                job = self._next_job(last_beat)
            if not ray.is_initialized():
                # Ray was shut down under this client; a remote call now would start a
                # new local Ray (Ray initialises itself on .remote()). Stop instead.
                self._abandon()
                return
            if job is _STOP:
                self.spares.release()
                return
            if job is _RELEASE:
                self.spares.release()
            elif job is _BEAT:
                self.beat()
                last_beat = time.monotonic()
            else:
                self._send_batch(job)

    def _next_job(self, last_beat: float) -> Any:
        """Wait for the next job (``_cond`` held): a batch, or _STOP, _RELEASE, _BEAT."""
        while True:
            now = time.monotonic()
            if self._due(now):
                batch = self._segments
                self._outgoing, self._pending, self._segments = self._pending, {}, []
                self._pending_bytes = 0
                self._sending = True
                return batch
            if self.closed:
                return _STOP
            if self._done_writing(now):
                return _RELEASE
            wait = HEARTBEAT_S - (now - last_beat)
            if wait <= 0:
                return _BEAT
            if self._pending:
                wait = min(wait, self._send_wait(now))
            elif self.spares:
                wait = min(wait, WRITE_IDLE_S - (now - self.last_put))
            self._cond.wait(max(0.001, wait))

    def beat(self) -> None:
        """Tell the actor this client is alive, with its counts since the last time."""
        if not self._link.dead:
            self._link.submit("touch", self._link.client_id, *self._counts())
            self._map.reads.report_unsent()  # bytes of chunks mapped since the last report

    def _send(self, chunks: list[Chunk]) -> bool:
        """Send a batch of chunks to the actor and apply its reply; False if it was lost."""
        start = time.monotonic()
        reply = self.inserts.send(chunks, self._map.version)
        if reply is LOST:
            lost = sum(len(chunk) for chunk in chunks)
            logger.warning("raycache %s: %d inserted items were not cached", self._link.name, lost)
            return False
        # The reply holds the map's changes since the version sent, these items' places
        # among them: applying it here spares the trainer's next miss a sync of its own
        # (a round trip to an actor that is busy storing).
        with self._map.lock:
            self._map.apply(reply.sync, start, news=reply.news_from_elsewhere())
        return True

    def _send_batch(self, batch: list[Segment]) -> None:
        sent = not self._link.dead and self._send([segment.chunk() for segment in batch])
        with self._cond:
            self._sending = False
            self._outgoing = {}
            # Sent: their buffers can take new items. Nothing else may keep the segments,
            # or releasing the spares would not free their columns. Lost (a call timed
            # out): an actor still working may yet read them, so they are never reused.
            if sent:
                self.spares.give([b for segment in batch for b in segment.builder.buffers])
            if not self._pending:
                self._flush_requested = False
            self._cond.notify_all()

    def _abandon(self) -> None:
        self._link.dead = True
        with self._cond:
            self._pending = {}
            self._segments = []
            self._sending = False
            self._cond.notify_all()

    def _due(self, now: float) -> bool:
        """Return True when the buffered items are to be sent now (``_cond`` held)."""
        if not self._pending:
            return False
        if self._flush_requested or self.closed or len(self._segments) > 1:
            return True
        return self._segments[-1].full() or self._send_wait(now) <= 0

    def _send_wait(self, now: float) -> float:
        """Return how long the buffered items may still wait before they are sent.

        A process filling the cache alone sends a chunk's worth at a time (see
        ``ALONE_FLUSH_S``); otherwise items wait at most ``flush_interval_s`` and 8 MiB.
        """
        if self._alone():
            return min(
                self._interval - (now - self.last_put),
                ALONE_FLUSH_S - (now - self._first_pending),
            )
        if self._pending_bytes >= FLUSH_BYTES:
            return 0.0
        return self._interval - (now - self._first_pending)

    def _done_writing(self, now: float) -> bool:
        """Return True when the column buffers kept for inserts are no longer worth keeping.

        That is once nothing waits to be sent and this process has inserted nothing for
        ``WRITE_IDLE_S`` (the caller holds ``_cond``).
        """
        return (
            not self._pending
            and not self._sending
            and now - self.last_put >= WRITE_IDLE_S
            and bool(self.spares)
        )
