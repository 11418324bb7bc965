"""The directory's map of a cache: which chunk and row holds each index, and its event log.

This is the state the directory actor guards, with no Ray call in it: the chunk
references it holds are opaque values (ObjectRefs in the actor, anything in a test),
and the actor stores and fetches the bytes. It is not thread-safe; the actor calls it
under its lock.

The map is two int32 arrays (chunk id and row for each index), 8 bytes per item, so a
million-item cache costs ~8 MB and a new client gets it in one reply. Clients keep a
copy and catch up through a log of numbered events (``AddEvent``, ``RetireEvent``); a
client more than ``SNAPSHOT_AFTER`` events behind gets the whole map instead, which is
smaller than that many events.

Guarantees: an index, once cached, keeps its first value (``new_positions`` drops
indices that are cached or repeated); only compaction moves a cached index, to a chunk
holding the same bytes; the bytes of live chunks never exceed ``max_bytes``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raycache.protocol import AddEvent, Events, Inflight, MapEvent, RetireEvent, Snapshot

__all__ = ["MERGED_CHUNK_BYTES", "SNAPSHOT_AFTER", "ChunkMap"]

# A client more than this many events behind gets a full snapshot instead.
SNAPSHOT_AFTER = 256
# Small segments are merged into chunks of this many bytes (or ``chunk_bytes``, if less),
# and a segment of half that or more is kept as it is. Merging writes every merged byte a
# second time, and the store pages of the segments last merged stay resident once freed
# (Ray keeps freed store pages for reuse): up to one merged chunk above the data when a
# fill ends. Three trainers filling on miss at once send segments of up to 8 MiB (a
# trainer sends once that much is waiting, ``client.write_buffer.FLUSH_BYTES``), which
# merged into 64 MiB chunks left the store at 1.23-1.70x the data after filling 96-288 MB
# (docs/memory.md). A reader pays one mapping per chunk, small beside copying 8 MiB.
MERGED_CHUNK_BYTES = 16 * 1024 * 1024


class ChunkMap:
    """Index -> (chunk, row), the live chunks and the log of changes.

    Parameters
    ----------
    length : int
        Number of provider indices.
    max_bytes : int
        Most bytes the live chunks may hold.
    chunk_rows : int
        Segments are compacted up to this many items...
    chunk_bytes : int
        ...and this many bytes (at most ``MERGED_CHUNK_BYTES``).
    """

    def __init__(self, length: int, max_bytes: int, chunk_rows: int, chunk_bytes: int):
        self.chunk_of = np.full(length, -1, dtype=np.int32)
        self.row_of = np.zeros(length, dtype=np.int32)
        self.refs: dict[int, Any] = {}  # chunk id -> reference to its stored bytes
        self.sizes: dict[int, tuple[int, int]] = {}  # chunk id -> (rows, bytes)
        self.events: list[MapEvent] = []
        self.max_bytes = int(max_bytes)
        self.chunk_rows = int(chunk_rows)
        self.chunk_bytes = int(chunk_bytes)
        self.items = 0  # indices cached
        self.nbytes = 0  # bytes of live chunks
        self.rejected = 0  # items refused for the byte budget
        self._next_cid = 0
        self._open: list[int] = []  # small segments waiting to be compacted

    # ------------------------------------------------------------------ queries
    @property
    def version(self) -> int:
        """Return the number of events so far: the map's version."""
        return len(self.events)

    def is_cached(self, idx: int) -> bool:
        """Return True if index ``idx`` is cached."""
        return bool(self.chunk_of[idx] >= 0)

    def cached(self, indices: np.ndarray) -> np.ndarray:
        """Return, per index, whether it is cached."""
        return self.chunk_of[indices] >= 0

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Return the indices of ``indices`` that are not cached."""
        return indices[self.chunk_of[indices] < 0]

    def new_positions(self, indices: np.ndarray) -> np.ndarray:
        """Return the positions in ``indices`` worth storing: uncached, first of each index.

        Two clients inserting the same index, or one chunk holding it twice, store it
        once; the first value stays.
        """
        keep = np.zeros(len(indices), dtype=bool)
        keep[np.unique(indices, return_index=True)[1]] = True
        keep &= self.chunk_of[indices] < 0
        return np.flatnonzero(keep)

    def rows_that_fit(self, nbytes: int, count: int) -> int:
        """Return how many of ``count`` rows of ``nbytes`` in all fit the budget.

        The rows left out are counted as rejected.
        """
        room = self.max_bytes - self.nbytes
        if nbytes <= room:
            return count
        per_row = max(1, math.ceil(nbytes / max(1, count)))
        fits = max(0, min(count, room // per_row))
        self.rejected += count - fits
        return fits

    def reply(self, since: int, inflight: Inflight | None) -> Events | Snapshot:
        """Return what changed since version ``since``: events, or the whole map.

        A client at version 0 has no map yet; while nothing is mapped, nothing changed,
        so it gets (no) events rather than a snapshot.
        """
        version = self.version
        if (since <= 0 and version > 0) or version - since > SNAPSHOT_AFTER:
            return Snapshot(
                version, self.chunk_of.copy(), self.row_of.copy(), dict(self.refs), inflight
            )
        events = self.events[since:]
        added = {e.cid for e in events if isinstance(e, AddEvent)}
        refs = {cid: self.refs[cid] for cid in added if cid in self.refs}
        return Events(version, events, refs, inflight)

    def footprint(self) -> dict:
        """Return the bytes of the map arrays and the event log, and their counts."""
        events = sum(e.indices.nbytes + e.rows.nbytes for e in self.events if type(e) is AddEvent)
        return {
            "map_bytes": int(self.chunk_of.nbytes + self.row_of.nbytes),
            "event_log_bytes": int(events),
            "events": len(self.events),
            "chunks": len(self.refs),
        }

    # ------------------------------------------------------------------ changes
    def register(
        self, ref: Any, indices: np.ndarray, nbytes: int, replace: bool = False
    ) -> tuple[int, int]:
        """Map indices of a stored chunk to it; return (chunk id, newly cached count).

        Only indices not cached yet are mapped (the first row of a repeated index),
        unless ``replace`` (compaction), which moves cached indices to the new chunk.
        """
        cid = self._next_cid
        self._next_cid += 1
        rows = np.arange(len(indices), dtype=np.int32)
        if replace:
            keep = np.zeros(len(indices), dtype=bool)
            keep[np.unique(indices, return_index=True)[1]] = True
            positions = np.flatnonzero(keep)
        else:
            positions = self.new_positions(indices)
        idx, rows = indices[positions], rows[positions]
        self.chunk_of[idx] = cid
        self.row_of[idx] = rows
        self.refs[cid] = ref
        self.sizes[cid] = (len(indices), int(nbytes))
        self.nbytes += int(nbytes)
        if not replace:
            self.items += len(idx)
        self.events.append(AddEvent(cid, idx, rows))
        return cid, len(idx)

    def retire(self, cids: list[int]) -> None:
        """Forget chunks ``cids`` (their indices are mapped elsewhere, or dropped)."""
        for cid in cids:
            self.refs.pop(cid, None)
            self.nbytes -= self.sizes.pop(cid, (0, 0))[1]
        self.events.append(RetireEvent(list(cids)))

    def note_segment(self, cid: int) -> list[int]:
        """Record a stored chunk; return the small segments now due to be compacted.

        Items inserted one by one on epoch-1 misses arrive in small segments; readers
        want few large chunks. A chunk under half a chunk's rows and under half the
        merge size (``MERGED_CHUNK_BYTES``, or ``chunk_bytes`` if less) is a segment;
        segments are gathered until they would fill a chunk's rows or the merge size,
        then handed back, to be merged into one chunk (``register(..., replace=True)``,
        then ``retire``).
        """
        rows, nbytes = self.sizes[cid]
        merged_bytes = min(self.chunk_bytes, MERGED_CHUNK_BYTES)
        if rows >= self.chunk_rows // 2 or nbytes >= merged_bytes // 2:
            return []
        self._open.append(cid)
        total_rows = sum(self.sizes[c][0] for c in self._open)
        total_bytes = sum(self.sizes[c][1] for c in self._open)
        if total_rows < self.chunk_rows and total_bytes < merged_bytes:
            return []
        cids, self._open = self._open, []
        return cids if len(cids) > 1 else []

    def clear(self) -> None:
        """Retire every chunk and forget every index (the cache is dropped)."""
        self.retire(list(self.refs))
        self.chunk_of[:] = -1
        self.items = 0
        self._open = []
