"""The directory actor: one per cache, it owns the chunks and answers for the map.

Why an actor owns the data: in Ray the process that creates an object owns it, and
when the owner exits every reader gets ``OwnerDiedError``. ``ray.put(_owner=...)`` is
gone since Ray 2.56, so the only ways to give the cache's bytes an owner that outlives
the trainers are ``ray.put`` inside this actor and tasks this actor submits. The actor
is created ``lifetime="detached"`` because a named actor that is not detached dies with
the job that created it (the first trainer to exit would take everyone's cache); the
actor itself then decides when the cache goes away (see ``CacheDirectory._reap``).

This module is the actor's shell: its methods (what a trainer can call) and the reaper
thread; the methods that start and serve a preload are ``raycache.directory_preload``'s
``PreloadSide``, and those for a cache spread over nodes ``raycache.directory_cluster``'s
``ClusterSide``. Storing chunks is
``raycache.directory_store.ChunkStore``; the map, its event log, deduplication and
compaction planning are ``raycache.directory_map.ChunkMap`` and the clients' liveness
``raycache.directory_clients.ClientTable``, both free of Ray calls. ``directory_actor``
is the one way to get a handle to the actor; its replies are the records of
``raycache.protocol``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from raycache.chunk import Chunk, chunk_rows
from raycache.directory_clients import ClientTable
from raycache.directory_cluster import ClusterSide
from raycache.directory_map import SNAPSHOT_AFTER, ChunkMap
from raycache.directory_preload import PreloadSide
from raycache.directory_store import ChunkStore
from raycache.errors import CacheMismatchError
from raycache.identity import mismatch_message
from raycache.preload import PreloadRun
from raycache.protocol import (
    InsertResult,
    Settings,
    SyncReply,
)
from raycache.staged_columns import StagingUnavailable, open_staged

__all__ = ["SNAPSHOT_AFTER", "CacheDirectory", "directory_actor"]

logger = logging.getLogger(__name__)

# A client that has not been heard from for this long is considered gone.
CLIENT_TIMEOUT_S = 30.0
REAP_INTERVAL_S = 1.0


class CacheDirectory(ClusterSide, PreloadSide):
    """State of one cache. Created through ``directory_actor``.

    Parameters
    ----------
    spec : dict
        ``name``, ``length``, ``fingerprint``, ``chunk_size``, ``chunk_bytes``,
        ``max_bytes`` (None: 80% of the object store), ``detached``, ``linger_s``,
        ``log_dir``.
    """

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self._lock = threading.RLock()
        max_bytes = spec.get("max_bytes")
        if max_bytes is None:
            store = ray.cluster_resources().get("object_store_memory", 2**31)
            max_bytes = int(0.8 * store)
        chunk_bytes = int(spec["chunk_bytes"])
        chunk_map = ChunkMap(
            int(spec["length"]),
            int(max_bytes),
            chunk_rows(spec.get("chunk_size"), chunk_bytes, None),
            chunk_bytes,
        )
        self._store = ChunkStore(spec["name"], chunk_map, self._lock)
        self.map = chunk_map
        ClusterSide.__init__(self, chunk_map, self._lock, self.spec)  # lost chunks, locality
        self._clients = ClientTable()
        self._preload: PreloadRun | None = None
        self._writer = None
        if spec.get("log_dir"):
            from raycache.metrics import Metrics

            self._writer = Metrics(spec["log_dir"], f"directory-{spec['name']}")
        self._reaper = threading.Thread(target=self._reap, name="raycache-reaper", daemon=True)
        self._reaper.start()

    # ----------------------------------------------------------------- clients
    def attach(self, client_id: str, info: dict, spec: dict) -> Settings:
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
        Settings
            The cache's settings, which every client follows.
        """
        mine, theirs = self.spec["fingerprint"], spec["fingerprint"]
        if int(spec["length"]) != int(self.spec["length"]) or mine != theirs:
            raise CacheMismatchError(
                mismatch_message(
                    self.spec["name"], int(self.spec["length"]), mine, int(spec["length"]), theirs
                )
            )
        with self._lock:
            self._clients.attach(client_id, info, time.monotonic())
            if spec.get("detached") and not self.spec["detached"]:
                # A process that asks to keep the cache gets it kept, whoever created it;
                # nothing makes a kept cache lingering again but dropping it.
                self.spec["detached"] = True
                logger.info("raycache %s: kept from now on (detached)", self.spec["name"])
        return Settings(
            length=int(self.spec["length"]),
            chunk_size=self.spec["chunk_size"],
            chunk_bytes=self.map.chunk_bytes,
            max_bytes=self.map.max_bytes,
            detached=bool(self.spec["detached"]),
        )

    def detach(self, client_id: str, hits: int = 0, misses: int = 0) -> None:
        """Unregister a client (the cache stays; see ``_reap`` for when it goes)."""
        with self._lock:
            self._clients.seen(client_id, time.monotonic(), hits, misses)
            self._clients.detach(client_id, time.monotonic())
        self._release_all(client_id)

    def _release_all(self, client_id: str) -> None:
        # Not under self._lock: the preload takes its own lock, then this one.
        run = self._preload
        if run is not None:
            run.release(client_id)

    def touch(self, client_id: str, hits: int = 0, misses: int = 0) -> None:
        """Heartbeat from a client, with its hit and miss counts since the last one."""
        with self._lock:
            self._clients.seen(client_id, time.monotonic(), hits, misses)

    # ----------------------------------------------------------------- map
    def sync(self, client_id: str, since: int, hits: int = 0, misses: int = 0) -> SyncReply:
        """Return what changed in the map since event number ``since``.

        Returns
        -------
        Events or Snapshot
            The events since ``since``, or for a new or far-behind client the whole map
            (``ChunkMap.reply``), with the preload units being read.
        """
        self.touch(client_id, hits, misses)
        with self._lock:
            run = self._running()
            return self.map.reply(since, dict(run.inflight) if run is not None else None)

    def footprint(self) -> dict:
        """Return the map's and the event log's bytes and counts (for measurements)."""
        with self._lock:
            return self.map.footprint()

    def insert(
        self, chunks: list[Chunk], client_id: str | None = None, since: int = -1
    ) -> InsertResult:
        """Store the items of ``chunks`` that are not cached yet (``ChunkStore.insert``).

        Parameters
        ----------
        chunks : list of Chunk
            The chunks a client sent.
        client_id : str, optional
            The sending client: the result then holds its news.
        since : int
            The version of that client's map.

        Returns
        -------
        InsertResult
            Items added and rejected; with ``client_id``, also what
            ``sync(client_id, since)`` returns after the insert, which saves the client
            a second call, and how many of those events this insert made.
        """
        result = self._store.insert(chunks)
        if client_id is None:
            return result
        return result._replace(sync=self.sync(client_id, since))

    def insert_staged(
        self,
        chunks: list[Chunk],
        pid: int,
        node_id: str,
        client_id: str | None = None,
        since: int = -1,
    ) -> InsertResult | None:
        """As ``insert``, for chunks whose arrays lie in process ``pid``'s shared memory.

        Parameters
        ----------
        chunks : list of Chunk
            Chunks with ``StagedArray`` references (``raycache.staged_columns``).
        pid : int
            The sending process.
        node_id : str
            Its Ray node: the memory is read only on this actor's own node.
        client_id : str, optional
            As for ``insert``.
        since : int
            As for ``insert``.

        Returns
        -------
        InsertResult or None
            As ``insert``; None if the memory cannot be read here (then nothing was
            stored, and the client sends the chunks themselves).
        """
        if node_id != ray.get_runtime_context().get_node_id():
            return None
        try:
            opened = open_staged(chunks, pid)
        except StagingUnavailable as exc:
            name = self.spec["name"]
            logger.info("raycache %s: staged insert from pid %d not read: %s", name, pid, exc)
            return None
        return self.insert(opened, client_id, since)

    def add_preloaded(self, chunk_ref: Any, summary: dict) -> bool:
        """Register a chunk returned by a preload task; False once the budget is full."""
        return self._store.add_preloaded(chunk_ref, summary)

    # ----------------------------------------------------------------- info
    def stats(self, client_id: str | None = None, hits: int = 0, misses: int = 0) -> dict:
        """Return the cache's counters; see ``DataCache.stats``.

        A client passes its id and its hit and miss counts since it last sent them, which
        are counted before the answer (a heartbeat sent beside this call might not be).
        """
        with self._lock:
            if client_id is not None:
                self._clients.seen(client_id, time.monotonic(), hits, misses)
            preload = self._preload.status() if self._preload is not None else {"state": "idle"}
            return {
                "name": self.spec["name"],
                "length": int(self.spec["length"]),
                "items": int(self.map.items),
                "bytes": int(self.map.nbytes),
                "max_bytes": self.map.max_bytes,
                "chunks": len(self.map.refs),
                "hits": self._clients.hits,
                "misses": self._clients.misses,
                "rejected_items": self.map.rejected,
                "inserted_items": self._store.inserted,
                "preloaded_items": self._store.preloaded,
                "clients": len(self._clients.info),
                "detached": bool(self.spec["detached"]),
                "fingerprint": self.spec["fingerprint"],
                "preload": preload,
                "preload_errors": preload.get("errors", []),
                **self.cluster_stats(),
            }

    def drop(self) -> None:
        """Free every chunk; the caller then kills this actor."""
        with self._lock:
            self._store.dropped = True
            if self._preload is not None:
                self._preload.stop()
            self.map.clear()
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
                gone = self._clients.silent(now, CLIENT_TIMEOUT_S)
                for c in gone:
                    logger.warning("raycache %s: client %s stopped answering", self.spec["name"], c)
                expire = (
                    not self.spec["detached"]
                    and self._running() is None
                    and not self._clients.info
                    and self._clients.idle_for(now) >= float(self.spec["linger_s"])
                )
            for c in gone:  # what a silent client reserved, the preload reads
                self._release_all(c)
            if expire:
                logger.info("raycache %s: no client for linger_s; freeing", self.spec["name"])
                self.drop()
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


_Directory = ray.remote(CacheDirectory)


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
