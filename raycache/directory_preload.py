"""The directory actor's preload side: starting a preload and serving its tasks and trainers.

``PreloadSide`` is a base of ``raycache.directory.CacheDirectory``; these are actor methods
of every cache. A preload runs as Ray tasks that this actor submits (so that it owns what
they return, see ``raycache.directory``); the run's bookkeeping is
``raycache.preload.PreloadRun`` (or ``raycache.locality_preload.LocalityRun``). Here are
the calls that reach it: tasks claim units, trainers reserve the misses no unit holds and
wait for an index a unit is reading instead of reading it a second time.

It uses the state ``CacheDirectory`` sets up: ``spec``, ``map``, ``_lock``, ``_store``,
``_preload``, ``_writer``, and the methods ``sync``, ``add_preloaded`` and ``preload_run``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from raycache.preload import PreloadRun
from raycache.protocol import READ_IT, STORED, ReserveResult, SyncReply

__all__ = ["PreloadSide"]


class PreloadSide:
    """Actor methods that start a preload and serve its tasks and the trainers beside it."""

    def start_preload(
        self,
        provider_blob: bytes,
        threads: int,
        cpus_per_task: float = 1.0,
        item_timeout: float | None = None,
        on_error: str = "continue",
        plan: Any = None,
    ) -> dict:
        """Start the preload unless one has run or is running; returns its status.

        ``plan``: a ``raycache.locality.LocalityPlan`` to follow (see ``preload_run``).
        """
        with self._lock:
            if self._preload is None and not self._store.dropped:
                self._preload = self.preload_run(
                    plan,
                    length=int(self.spec["length"]),
                    provider_blob=provider_blob,
                    threads=int(threads),
                    chunk_size=self.spec["chunk_size"],
                    chunk_bytes=self.map.chunk_bytes,
                    cpus_per_task=float(cpus_per_task),
                    directory=ray.get_runtime_context().current_actor,
                    missing=self._store.missing,
                    add_chunk=self.add_preloaded,
                    on_progress=self._log_preload,
                    item_timeout_s=item_timeout,
                    stop_on_error=on_error == "stop",
                )
            return self._preload.status() if self._preload is not None else {"state": "idle"}

    def preload_claim(self, key: str, done: tuple | None) -> tuple | None:
        """Hand the calling preload task its next unit (see ``PreloadRun.claim``)."""
        run = self._preload
        if run is None or run.key != key or self._store.dropped:
            return None
        return run.claim(done)

    def _running(self) -> PreloadRun | None:
        run = self._preload
        return run if run is not None and not run.done_event.is_set() else None

    def reserve(self, client_id: str, indices: np.ndarray, spares: int = 0) -> ReserveResult:
        """Reserve for a trainer the misses no preload unit holds (see ``PreloadRun.reserve``).

        Returns
        -------
        ReserveResult
            The state of each index and the spares, as ``PreloadRun.reserve`` gives
            them, and the units being read; with no preload running, ``inflight`` is
            None and nothing is held or reserved (what the preload stored before it
            ended is still ``STORED``).
        """
        run = self._running()
        indices = np.asarray(indices, dtype=np.int64)
        if run is None or self._store.dropped:
            with self._lock:
                stored = self.map.cached(indices)
            state = np.where(stored, STORED, READ_IT).astype(np.int8)
            return ReserveResult(state, np.zeros(0, dtype=np.int64), None)
        state, picked = run.reserve(client_id, indices, int(spares))
        return ReserveResult(state, picked, dict(run.inflight))

    def release_reserved(self, client_id: str, indices: np.ndarray) -> None:
        """End a trainer's reservations on ``indices``: the preload reads them."""
        run = self._preload
        if run is not None:
            run.release(client_id, np.asarray(indices, dtype=np.int64))

    def wait_cached(self, idx: int, timeout: float, client_id: str, since: int) -> SyncReply | None:
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
        Events or Snapshot or None
            Once ``idx`` is cached, what ``sync(client_id, since)`` returns, which holds
            its place (the client needs no sync of its own to read it); None if it is
            not cached.
        """
        deadline = time.monotonic() + timeout
        with self._store.added:
            while not self.map.is_cached(idx):
                run = self._preload
                left = deadline - time.monotonic()
                if run is None or left <= 0 or not run.is_reading(idx):
                    return None
                # Woken by every registration; the slice re-checks units that ended
                # without one (all their items failed).
                self._store.added.wait(min(left, 0.1))
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
            self._writer.scalar("DataCache/cache_count", self.map.items)
            self._writer.scalar("DataCache/cache_bytes", self.map.nbytes)
