"""The directory actor: one per cache, it maps indices to chunks and owns the chunks.

Why an actor owns the data: in Ray the process that creates an object owns it, and
when the owner exits every reader gets ``OwnerDiedError``. ``ray.put(_owner=...)`` is
gone since Ray 2.56, so the only ways to give the cache's bytes an owner that outlives
the trainers are ``ray.put`` inside this actor and tasks this actor submits. The actor
is created ``lifetime="detached"`` because a named actor that is not detached dies with
the job that created it (the first trainer to exit would take everyone's cache); the
actor itself then decides when the cache goes away (see ``_reap``).

The map is two int32 arrays (chunk id and row for each index), 8 bytes per item, so a
million-item cache costs the actor ~8 MB and a new client gets it in one call. Clients
keep a copy and catch up through a log of numbered events; only misses ask for them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk, chunk_rows
from raycache.errors import CacheMismatchError
from raycache.preload import PreloadRun
from raycache.protocol import INLINE_LIMIT, READ_IT, STORED

__all__ = ["CacheDirectory", "SNAPSHOT_AFTER"]

logger = logging.getLogger(__name__)

# A client more than this many events behind gets a full snapshot instead.
SNAPSHOT_AFTER = 256
# A client that has not been heard from for this long is considered gone.
CLIENT_TIMEOUT_S = 30.0
REAP_INTERVAL_S = 1.0


class CacheDirectory:
    """State of one cache. Created through ``ray.remote`` by ``raycache.client``.

    Parameters
    ----------
    spec : dict
        ``name``, ``length``, ``fingerprint``, ``chunk_size``, ``chunk_bytes``,
        ``max_bytes`` (None: 80% of the object store), ``detached``, ``linger_s``,
        ``log_dir``.
    """

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        length = int(spec["length"])
        self._lock = threading.RLock()
        self._added = threading.Condition(self._lock)  # notified when indices are mapped
        self._chunk_of = np.full(length, -1, dtype=np.int32)
        self._row_of = np.zeros(length, dtype=np.int32)
        self._refs: dict[int, Any] = {}  # chunk id -> ObjectRef (the actor's own)
        self._sizes: dict[int, tuple[int, int]] = {}  # chunk id -> (rows, bytes)
        self._next_cid = 0
        self._events: list[tuple] = []  # ("add", cid, indices, rows) | ("retire", cids)
        self._open: list[int] = []  # small segments waiting to be compacted
        self._bytes = 0
        # Per actor call (each runs in a thread of its own): events the call appended.
        self._call = threading.local()
        self._items = 0
        self._rejected = 0
        self._inserted = 0  # items stored from clients' inserts
        self._preloaded = 0  # items stored from preload tasks
        self._hits = 0
        self._misses = 0
        self._clients: dict[str, dict] = {}
        self._idle_since: float | None = time.monotonic()
        self._preload: PreloadRun | None = None
        self._dropped = False
        max_bytes = spec.get("max_bytes")
        if max_bytes is None:
            store = ray.cluster_resources().get("object_store_memory", 2**31)
            max_bytes = int(0.8 * store)
        self._max_bytes = int(max_bytes)
        # Segments are compacted up to this many items (and chunk_bytes bytes).
        self._chunk_rows = chunk_rows(spec.get("chunk_size"), int(spec["chunk_bytes"]), None)
        self._writer = None
        if spec.get("log_dir"):
            from raycache.metrics import Metrics

            self._writer = Metrics(spec["log_dir"], f"directory-{spec['name']}")
        self._reaper = threading.Thread(target=self._reap, name="raycache-reaper", daemon=True)
        self._reaper.start()

    # ----------------------------------------------------------------- clients
    def attach(self, client_id: str, info: dict, spec: dict) -> dict:
        """Register a client after checking that it caches the same data.

        Parameters
        ----------
        client_id : str
            Unique id of the client.
        info : dict
            Host and pid, for ``stats()``.
        spec : dict
            The client's view of the cache (length, fingerprint).

        Returns
        -------
        dict
            The cache's settings, which every client follows.
        """
        mine, theirs = self.spec["fingerprint"], spec["fingerprint"]
        if int(spec["length"]) != int(self.spec["length"]) or mine != theirs:
            raise CacheMismatchError(
                f"cache {self.spec['name']!r} holds {self.spec['length']} items of "
                f"{mine!r}, but this client has {spec['length']} items of {theirs!r}; "
                "use another raycache.name, or drop the old cache with "
                f"raycache.drop_cache({self.spec['name']!r})"
            )
        with self._lock:
            self._clients[client_id] = dict(info, last_seen=time.monotonic())
            self._idle_since = None
        return {
            "length": int(self.spec["length"]),
            "chunk_size": self.spec["chunk_size"],
            "chunk_bytes": int(self.spec["chunk_bytes"]),
            "max_bytes": self._max_bytes,
            "detached": bool(self.spec["detached"]),
        }

    def detach(self, client_id: str, hits: int = 0, misses: int = 0) -> None:
        """Unregister a client (the cache stays; see ``_reap`` for when it goes)."""
        with self._lock:
            self._hits += hits
            self._misses += misses
            self._clients.pop(client_id, None)
            if not self._clients:
                self._idle_since = time.monotonic()
        self._release_all(client_id)

    def _release_all(self, client_id: str) -> None:
        # Not under self._lock: the preload takes its own lock, then this one.
        run = self._preload
        if run is not None:
            run.release(client_id)

    def touch(self, client_id: str, hits: int = 0, misses: int = 0) -> None:
        """Heartbeat from a client, with its hit and miss counts since the last one."""
        with self._lock:
            self._hits += hits
            self._misses += misses
            if client_id in self._clients:
                self._clients[client_id]["last_seen"] = time.monotonic()

    # ----------------------------------------------------------------- map
    def sync(self, client_id: str, since: int, hits: int = 0, misses: int = 0) -> tuple:
        """Return what changed in the map since event number ``since``.

        Returns
        -------
        tuple
            ``("events", version, events, refs, inflight)`` or, for a new or far
            behind client, ``("snapshot", version, chunk_of, row_of, refs, inflight)``.
            ``refs`` holds the ObjectRefs of chunks added (all live ones in a snapshot);
            ``inflight`` maps the first index of each preload unit being read to its
            end (``wait_cached`` waits for one); None when no preload is running.
        """
        self.touch(client_id, hits, misses)
        with self._lock:
            version = len(self._events)
            run = self._running()
            inflight = dict(run.inflight) if run is not None else None
            # (A client at 0 has no map yet; while nothing is mapped, nothing changed.)
            if (since <= 0 and version > 0) or version - since > SNAPSHOT_AFTER:
                return (
                    "snapshot",
                    version,
                    self._chunk_of.copy(),
                    self._row_of.copy(),
                    dict(self._refs),
                    inflight,
                )
            events = self._events[since:]
            added = {e[1] for e in events if e[0] == "add"}
            refs = {cid: self._refs[cid] for cid in added if cid in self._refs}
            return ("events", version, events, refs, inflight)

    def _register(
        self, ref: Any, chunk_indices: np.ndarray, nbytes: int, replace: bool = False
    ) -> tuple[int, int]:
        """Map indices of a stored chunk to it; returns (cid, newly cached count).

        Only indices not cached yet are mapped, unless ``replace`` (compaction), which
        moves already cached indices to the new chunk.
        """
        cid = self._next_cid
        self._next_cid += 1
        rows = np.arange(len(chunk_indices), dtype=np.int32)
        new = (
            np.ones(len(chunk_indices), dtype=bool)
            if replace
            else self._chunk_of[chunk_indices] < 0
        )
        # The same index twice in one chunk: the first row wins.
        _, first = np.unique(chunk_indices, return_index=True)
        keep = np.zeros(len(chunk_indices), dtype=bool)
        keep[first] = True
        new &= keep
        idx, rows = chunk_indices[new], rows[new]
        self._chunk_of[idx] = cid
        self._row_of[idx] = rows
        self._refs[cid] = ref
        self._sizes[cid] = (len(chunk_indices), int(nbytes))
        self._bytes += int(nbytes)
        if not replace:
            self._items += len(idx)
        self._log_event(("add", cid, idx, rows))
        self._added.notify_all()
        return cid, len(idx)

    def _retire(self, cids: list[int]) -> None:
        for cid in cids:
            self._refs.pop(cid, None)
            _, nbytes = self._sizes.pop(cid, (0, 0))
            self._bytes -= nbytes
        self._log_event(("retire", list(cids)))

    def _log_event(self, event: tuple) -> None:
        """Append a map change to the event log, counted for the calling actor call."""
        self._events.append(event)
        self._call.events = getattr(self._call, "events", 0) + 1

    # ----------------------------------------------------------------- writes
    def insert(self, chunks: list[Chunk], client_id: str | None = None, since: int = -1) -> dict:
        """Store the items of ``chunks`` that are not cached yet.

        The client's chunk arrives as an argument (its bytes owned by the client);
        the actor keeps its own copy with ``ray.put`` so that the bytes outlive the
        client. Indices already cached are dropped first, so two clients inserting
        the same index store and count it once.

        Returns
        -------
        dict
            ``{"added": n, "rejected": n}``: rejected items did not fit ``max_bytes``.
            With ``client_id``, also ``"sync"``: what ``sync(client_id, since)`` would
            return after the insert, which saves the client a second call, and
            ``"events"``: how many of its events this insert made (the others came
            from elsewhere).
        """
        self._call.events = 0
        added = rejected = 0
        for chunk in chunks:
            result = self._insert_one(chunk)
            added += result["added"]
            rejected += result["rejected"]
        out = {"added": added, "rejected": rejected}
        if client_id is not None:
            out["sync"] = self.sync(client_id, since)
            out["events"] = self._call.events
        return out

    def _insert_one(self, chunk: Chunk) -> dict:
        result, full = self._store_inserted(chunk)
        if full:
            self._compact(full)
        return result

    def _store_inserted(self, chunk: Chunk) -> tuple[dict, list[int]]:
        """Store one inserted chunk; return the result and the segments due to be merged.

        The ``ray.put`` runs under the lock, one insert at a time. Tried on 2026-12-02:
        outside the lock (indices and bytes reserved meanwhile), puts ran in parallel
        and, since freed store pages stay resident, three trainers filling on miss grew
        the node's memory by 2.8-2.9 bytes per byte of data instead of 1.7-1.9, with no
        measured gain for the trainer.
        """
        with self._lock:
            if self._dropped:
                return {"added": 0, "rejected": len(chunk)}, []
            idx = chunk.indices
            _, first = np.unique(idx, return_index=True)
            keep = np.zeros(len(idx), dtype=bool)
            keep[first] = True
            keep &= self._chunk_of[idx] < 0
            if not keep.any():
                return {"added": 0, "rejected": 0}, []
            if not keep.all():
                chunk = chunk.take(np.flatnonzero(keep))
            chunk, rejected = self._fit_budget(chunk)
            if not len(chunk):
                return {"added": 0, "rejected": rejected}, []
            cid, added = self._register(ray.put(chunk), chunk.indices, chunk.nbytes)
            self._inserted += added
            rows, nbytes = self._sizes[cid]
            full: list[int] = []
            if rows < self._chunk_rows // 2 and nbytes < self.spec["chunk_bytes"] // 2:
                self._open.append(cid)
                full = self._due_for_compaction()
            return {"added": added, "rejected": rejected}, full

    def _fit_budget(self, chunk: Chunk) -> tuple[Chunk, int]:
        room = self._max_bytes - self._bytes
        if chunk.nbytes <= room:
            return chunk, 0
        per_row = max(1, math.ceil(chunk.nbytes / max(1, len(chunk))))
        fits = max(0, min(len(chunk), room // per_row))
        rejected = len(chunk) - fits
        self._rejected += rejected
        logger.warning(
            "raycache %s: byte budget max_bytes=%d reached; %d items not cached",
            self.spec["name"],
            self._max_bytes,
            rejected,
        )
        return chunk.take(np.arange(fits)), rejected

    def _due_for_compaction(self) -> list[int]:
        """Take the small segments once they would fill a chunk (under the lock).

        Items inserted one by one on epoch-1 misses arrive in small segments; readers
        want few large chunks. Segments are gathered until they hold ``chunk_size``
        items or ``chunk_bytes`` bytes; then they are handed to ``_compact``.
        """
        rows = sum(self._sizes[c][0] for c in self._open)
        nbytes = sum(self._sizes[c][1] for c in self._open)
        if rows < self._chunk_rows and nbytes < self.spec["chunk_bytes"]:
            return []
        cids, self._open = self._open, []
        return cids if len(cids) > 1 else []

    def _compact(self, cids: list[int]) -> None:
        """Rewrite segments ``cids`` as one chunk and free them.

        Fetching, concatenating and storing a chunk's worth of bytes takes tens of
        milliseconds; it runs outside the lock so that clients' syncs and inserts do
        not wait for it. Segments are only ever retired here or by ``drop``, and
        inserts never remap a cached index, so the rows read outside the lock are
        still the ones the map points at, unless the cache was dropped meanwhile.
        """
        with self._lock:
            refs = [self._refs.get(c) for c in cids]
        if any(r is None for r in refs):
            return  # dropped meanwhile
        merged = Chunk.concat(ray.get(refs))
        ref = ray.put(merged)
        with self._lock:
            if self._dropped:
                return
            self._register(ref, merged.indices, merged.nbytes, replace=True)
            self._retire(cids)

    def add_preloaded(self, chunk_ref: Any, summary: dict) -> bool:
        """Register a chunk returned by a preload task; False once the budget is full."""
        with self._lock:
            if self._dropped:
                return False
            if summary["nbytes"] > self._max_bytes - self._bytes:
                chunk, _ = self._fit_budget(ray.get(chunk_ref))
                if len(chunk):
                    _, added = self._register(ray.put(chunk), chunk.indices, chunk.nbytes)
                    self._preloaded += added
                return False
            if summary["nbytes"] < INLINE_LIMIT:
                # Small task returns live in this actor's heap and are copied into each
                # reader; put them into the shared store instead.
                chunk_ref = ray.put(ray.get(chunk_ref))
            # Indices a trainer inserted while the unit was read stay as they are.
            _, added = self._register(chunk_ref, summary["indices"], summary["nbytes"])
            self._preloaded += added
            return True

    def _missing(self, indices: np.ndarray) -> np.ndarray:
        with self._lock:
            return indices[self._chunk_of[indices] < 0]

    # ----------------------------------------------------------------- preload
    def start_preload(self, provider_blob: bytes, threads: int, cpus_per_task: float = 1.0) -> dict:
        """Start the preload unless one has run or is running; returns its status."""
        with self._lock:
            if self._preload is None and not self._dropped:
                self._preload = PreloadRun(
                    length=int(self.spec["length"]),
                    provider_blob=provider_blob,
                    threads=int(threads),
                    chunk_size=self.spec["chunk_size"],
                    chunk_bytes=int(self.spec["chunk_bytes"]),
                    cpus_per_task=float(cpus_per_task),
                    directory=ray.get_runtime_context().current_actor,
                    missing=self._missing,
                    add_chunk=self.add_preloaded,
                    on_progress=self._log_preload,
                )
            return self._preload.status() if self._preload is not None else {"state": "idle"}

    def preload_claim(self, key: str, done: tuple | None) -> tuple | None:
        """Hand the calling preload task its next unit (see ``PreloadRun.claim``)."""
        run = self._preload
        if run is None or run.key != key or self._dropped:
            return None
        return run.claim(done)

    def _running(self) -> PreloadRun | None:
        run = self._preload
        return run if run is not None and not run.done_event.is_set() else None

    def reserve(self, client_id: str, indices: np.ndarray, spares: int = 0) -> tuple:
        """Reserve for a trainer the misses no preload unit holds (see ``PreloadRun.reserve``).

        Returns
        -------
        tuple
            ``(state, spare_indices, inflight)``: as ``PreloadRun.reserve``, and the
            units being read (as in ``sync``); ``inflight`` is None when no preload is
            running, and then nothing is held or reserved (but what the preload stored
            before it ended is still ``STORED``).
        """
        run = self._running()
        indices = np.asarray(indices, dtype=np.int64)
        if run is None or self._dropped:
            with self._lock:
                stored = self._chunk_of[indices] >= 0
            state = np.where(stored, STORED, READ_IT).astype(np.int8)
            return state, np.zeros(0, dtype=np.int64), None
        state, picked = run.reserve(client_id, indices, int(spares))
        return state, picked, dict(run.inflight)

    def release_reserved(self, client_id: str, indices: np.ndarray) -> None:
        """End a trainer's reservations on ``indices``: the preload reads them."""
        run = self._preload
        if run is not None:
            run.release(client_id, np.asarray(indices, dtype=np.int64))

    def wait_cached(self, idx: int, timeout: float, client_id: str, since: int) -> tuple | None:
        """Block until ``idx`` is cached, or up to ``timeout`` s; then the client's news.

        A trainer that misses an index the preload is reading waits here instead of
        reading the item a second time. It returns early, None, once no preload unit
        holds ``idx`` any more (read with an error, or the run stopped).

        Parameters
        ----------
        idx : int
            The index waited for.
        timeout : float
            Seconds to wait at most.
        client_id : str
            The waiting client.
        since : int
            The version of the client's map.

        Returns
        -------
        tuple or None
            Once ``idx`` is cached, what ``sync(client_id, since)`` returns, which holds
            its place (the client needs no sync of its own to read it); None if it is
            not cached.
        """
        deadline = time.monotonic() + timeout
        with self._added:
            while self._chunk_of[idx] < 0:
                run = self._preload
                left = deadline - time.monotonic()
                if run is None or left <= 0 or not run.is_reading(idx):
                    return None
                # Woken by every registration; the slice re-checks units that ended
                # without one (all their items failed).
                self._added.wait(min(left, 0.1))
        return self.sync(client_id, since)

    def wait_preload(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the preload to end; True if it has."""
        run = self._preload
        if run is None:
            return True
        return run.done_event.wait(timeout)

    def _log_preload(self, count: int, seconds: float) -> None:
        if self._writer is not None and count:
            self._writer.scalar("DataCache/preload_1k_obj_s", 1000.0 * seconds / count)
            self._writer.scalar("DataCache/cache_count", self._items)
            self._writer.scalar("DataCache/cache_bytes", self._bytes)

    # ----------------------------------------------------------------- info
    def stats(self) -> dict:
        """Return the cache's counters; see ``DataCache.stats``."""
        with self._lock:
            preload = self._preload.status() if self._preload is not None else {"state": "idle"}
            return {
                "name": self.spec["name"],
                "length": int(self.spec["length"]),
                "items": int(self._items),
                "bytes": int(self._bytes),
                "max_bytes": self._max_bytes,
                "chunks": len(self._refs),
                "hits": self._hits,
                "misses": self._misses,
                "rejected_items": self._rejected,
                "inserted_items": self._inserted,
                "preloaded_items": self._preloaded,
                "clients": len(self._clients),
                "detached": bool(self.spec["detached"]),
                "fingerprint": self.spec["fingerprint"],
                "preload": preload,
                "preload_errors": preload.get("errors", []),
            }

    def drop(self) -> None:
        """Free every chunk; the caller then kills this actor."""
        with self._lock:
            self._dropped = True
            if self._preload is not None:
                self._preload.stop()
            self._retire(list(self._refs))
            self._chunk_of[:] = -1
            self._items = 0
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _reap(self) -> None:
        """Forget silent clients; free a non-detached cache left idle for ``linger_s``.

        A cache must outlive the trainer that created it, so no single client's exit
        frees it. It goes away when nobody has used it for ``linger_s`` seconds (clients
        send heartbeats), unless it is detached, which keeps it until dropped.
        """
        while True:
            time.sleep(REAP_INTERVAL_S)
            with self._lock:
                now = time.monotonic()
                gone = [
                    c for c, i in self._clients.items() if now - i["last_seen"] > CLIENT_TIMEOUT_S
                ]
                for c in gone:
                    logger.warning("raycache %s: client %s stopped answering", self.spec["name"], c)
                    self._clients.pop(c)
                if not self._clients and self._idle_since is None:
                    self._idle_since = now
                running = self._running() is not None
                expire = (
                    not self.spec["detached"]
                    and not running
                    and self._idle_since is not None
                    and now - self._idle_since >= float(self.spec["linger_s"])
                )
            for c in gone:  # what a silent client reserved, the preload reads
                self._release_all(c)
            if expire:
                logger.info("raycache %s: no client for linger_s; freeing", self.spec["name"])
                self.drop()
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
