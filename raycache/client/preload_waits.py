"""What a trainer does about a miss while the cache's preload runs.

A miss on an index a preload unit is reading is waited for, not read a second time
(``await_unit``); the other misses of a batch are reserved for this process, which
reads them itself while the preload reads the rest (``being_preloaded``, and
``raycache.reservations`` on the actor's side). While it waits, the process reads
spare items: indices reserved for it from the top of what the preload has not reached
(``spare_index``), so that a wait adds a reader instead of idling.

Guarantees: a wait is bounded (``INFLIGHT_WAIT_S``, or the unit is given up on and the
trainer reads the item itself); every reserved index is either read by this process
or given back (``release_reserved``), so the preload never waits on an index nobody
reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from raycache.client.link import LOST, ActorLink
from raycache.client.local_map import LocalMap
from raycache.client.write_buffer import WriteBuffer
from raycache.config import CacheConfig
from raycache.errors import PreloadFailedError
from raycache.protocol import READ_IT, STORED, held_by_units, unit_holding

__all__ = ["INFLIGHT_WAIT_S", "SPARE_BLOCK", "SPARE_BLOCK_MAX", "PreloadWaits"]

logger = logging.getLogger(__name__)

# Longest a miss waits for the preload task reading its unit. The task may not even be
# scheduled (trainers holding every CPU): then the trainer reads the unit's items itself.
INFLIGHT_WAIT_S = 5.0
# Spare items reserved at a time, with the misses of a batch that waits for a unit: about
# what a trainer reads while it waits for one (2 ms reads, units of ~0.02-0.3 s).
SPARE_BLOCK = 8
# A wait that outlasts its block is likely a long one: each further block of the same
# wait is twice as big, up to this, so that a wait costs a few actor calls, not one per
# 8 reads (a call took ~4 ms beside a preload, two reads' time).
SPARE_BLOCK_MAX = 64


class PreloadWaits:
    """Waits on preload units, reservations and spare items for one client.

    Parameters
    ----------
    link : ActorLink
        The line to the directory actor.
    local_map : LocalMap
        The client's map (its units, its version).
    buffer : WriteBuffer
        The client's write buffer (a spare it holds is not read again).
    fork_reads : ForkReads, optional
        What a forked child asks its parent instead (``being_preloaded``).
    """

    def __init__(
        self,
        link: ActorLink,
        local_map: LocalMap,
        buffer: WriteBuffer,
        fork_reads: Any = None,
    ):
        self._link = link
        self.fork_reads = fork_reads  # a forked child's questions to its parent
        self._map = local_map
        self._buffer = buffer
        self.stalled: set[int] = set()  # units whose preload reader did not end in time
        self._spare_block: list[int] = []  # spare items reserved for this process
        self._spare_refills = 0  # blocks asked for since the wait began
        self._outcome_told = False  # the end of the preload was checked (_check_outcome)

    def start(self, provider_blob: bytes, config: CacheConfig) -> None:
        """Have the actor start the cache's preload (once per cache), then catch up.

        Parameters
        ----------
        provider_blob : bytes
            The pickled provider the preload tasks read.
        config : CacheConfig
            Its ``preload_threads`` (reads in flight), ``preload_cpus`` (per task),
            ``preload_item_timeout_s`` and ``preload_on_error``.
        """
        # A cache lost now (killed, dropped) is told once by the link; training goes on
        # from the provider, so starting its preload is not an error. A forked child
        # makes no Ray call: its parent starts the preload.
        if not self._link.usable():
            return
        args = (provider_blob, config.preload_threads, config.preload_cpus)
        args += (config.preload_item_timeout_s, config.preload_on_error)
        if self._link.call("start_preload", *args) is not LOST:
            self._map.sync(force=True)

    def wait_for_end(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for the preload to end.

        Returns
        -------
        bool
            True once no preload runs; False if ``timeout`` passed first.

        Raises
        ------
        CacheUnavailableError
            If the cache is lost for this process, or this is a forked child (which
            cannot ask); the message says which.
        PreloadFailedError
            If the preload ended having stored nothing (every read failed), or failed
            (every preload task failed, or the run itself did). One that stored some
            items and ended otherwise logs it once (INFO) instead.
        """
        if not self._link.usable():  # lost, or a forked child, which makes no Ray call
            raise self._link.unavailable()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 5.0 if deadline is None else min(5.0, deadline - time.monotonic())
            if left <= 0:
                return False
            # The actor blocks at most `left` seconds per call, so no call outlives it.
            ref = self._link.actor.wait_preload.remote(left)
            if ray.get(ref, timeout=left + self._link.timeout):
                self._map.sync(force=True)
                self._check_outcome()
                return True

    def _check_outcome(self) -> None:
        """Raise if the preload that ended stored nothing; warn once if some reads failed.

        A preload whose every read failed must not look like one that succeeded: the
        cache would hold nothing and every epoch would read the provider.
        """
        stats = self._link.call("stats")
        if stats is LOST:
            return
        run = stats.get("preload") or {}
        failed = int(run.get("error_count", 0))
        if not failed and run.get("state") != "failed":
            return
        errors = run.get("errors") or [{"index": None, "error": run.get("state", "")}]
        first = errors[0]
        lines = str(first["error"]).strip().splitlines()
        if first["index"] is None and len(errors) == 1:  # the run's own failure, not a read's
            what = lines[0] if lines else run.get("state", "")
        else:
            what = (
                f"{failed} of {stats['length']} items could not be read, {run.get('items', 0)} "
                f"stored (first: index {first['index']}: {lines[0] if lines else ''}); "
                "stats()['preload_errors'] lists every one"
            )
        if run.get("state") == "failed" or not run.get("items"):
            raise PreloadFailedError(f"the preload of cache {self._link.name!r} failed: {what}")
        if self._outcome_told:
            return
        self._outcome_told = True
        # INFO, not WARNING: stats() and the actor's log carry it, and a command line
        # tool that reports the preload's end itself must stay one line.
        logger.info("raycache %s: the preload ended with errors: %s", self._link.name, what)

    def being_preloaded(self, indices: np.ndarray, spares: bool = False) -> np.ndarray:
        """Return, per index, whether a preload unit this client may wait for holds it.

        While a preload runs, the actor is asked, and the misses no unit holds are
        reserved for this process, which reads them: the preload's units leave them out.
        With ``spares``, a batch that will wait for a unit also gets a block of spare
        items to read meanwhile (``spare_index``). A forked child, which makes no Ray
        call, asks its parent, which reserves them (``raycache.client.fork_reads``).

        Parameters
        ----------
        indices : numpy.ndarray
            The misses (int64).
        spares : bool
            Reserve a block of spare items too.

        Returns
        -------
        numpy.ndarray
            A bool per index: wait for it (True) or read it (False).
        """
        if self._link.forked and self.fork_reads is not None:
            return self.fork_reads.being_preloaded(indices, self._map.preloading)
        if self._map.preloading and self._link.usable():
            block = SPARE_BLOCK if spares and not self._spare_block else 0
            held, picked = self._reserve(indices, block)
            self._spare_block += picked.tolist()
            return held
        return held_by_units(self._map.inflight, indices, skip=self.stalled)

    def await_unit(self, idx: int, meanwhile: Callable[[], bool] | None) -> bool:
        """Wait for the preload unit reading ``idx``; True if ``idx`` is cached then.

        ``meanwhile`` is called again and again while the unit is not done, as long as
        it returns True (it reads an item the preload has not reached). Its errors (the
        provider's) are its caller's, and propagate.
        """
        # A preload reader is reading idx: wait for it instead of reading it too. The
        # units known here are as of the last sync, which may predate idx's unit, so
        # while a preload runs the actor is asked even where no known unit holds idx
        # (it answers None at once if none does).
        unit = unit_holding(self._map.inflight, idx)
        if unit in self.stalled:
            return False
        if unit is None and not (self._map.preloading and self._link.usable()):
            return False
        patience = min(self._link.timeout, INFLIGHT_WAIT_S)
        asked = time.monotonic()
        ref = self._link.submit(
            "wait_cached", idx, patience, self._link.client_id, self._map.version
        )
        if ref is LOST:
            return False
        try:
            while meanwhile is not None and not _answered(ref) and meanwhile():
                pass
        finally:
            self.release_spares()
        if not _answered(ref):
            # Nothing left to read here while the unit is read: a good moment to send what
            # this process inserted (the preload waits for reserved items to be stored).
            self._buffer.send_soon()
        reply = self._link.get(ref, patience + self._link.timeout)
        if reply is LOST:
            return False
        if reply is None:
            if time.monotonic() - asked >= patience:  # the unit outlasted the wait
                self._note_stalled(idx, unit)
            return False
        with self._map.lock:  # the map's news up to idx's unit: no sync of its own
            self._map.apply(reply, asked)
        return self._map.loc[idx] >= 0

    def _note_stalled(self, idx: int, unit: int | None) -> None:
        """Remember the unit holding ``idx`` as stalled: its items are not waited for again."""
        if unit is None:  # claimed since the last sync: learn which it is
            self._map.sync(force=True)
            unit = unit_holding(self._map.inflight, idx)
        if unit is not None:
            self.stalled.add(unit)

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
        while self._link.usable():
            while self._spare_block:
                idx = self._spare_block.pop(0)
                if self._map.loc[idx] < 0 and not self._buffer.holds(idx):
                    return idx
            if not self._map.preloading:
                return None
            self._spare_refills += 1
            count = min(SPARE_BLOCK << self._spare_refills, SPARE_BLOCK_MAX)
            _, picked = self._reserve(np.zeros(0, dtype=np.int64), count)
            if not len(picked):
                return None
            self._spare_block = picked.tolist()
        return None

    def release_spares(self) -> None:
        """Give back the spare items reserved for this process and not read yet."""
        block, self._spare_block = self._spare_block, []
        self._spare_refills = 0
        if block:
            self.release_reserved(block)

    def release_reserved(self, indices: list[int]) -> None:
        """Tell the actor this process will not read ``indices``: the preload reads them.

        Parameters
        ----------
        indices : list of int
            Indices reserved for this process.
        """
        if self._map.preloading and self._link.usable():
            self._link.submit(
                "release_reserved", self._link.client_id, np.asarray(indices, np.int64)
            )

    def _reserve(self, indices: np.ndarray, spares: int) -> tuple[np.ndarray, np.ndarray]:
        """Ask the actor to reserve ``indices`` and ``spares`` (``CacheDirectory.reserve``).

        Returns, per index, whether to wait for it instead of reading it (a unit holds
        it, or it was stored since the last sync, which the next miss then forces),
        and the spares reserved.
        """
        reply = self._link.call("reserve", self._link.client_id, indices, spares)
        if reply is LOST:
            return np.zeros(len(indices), dtype=bool), np.zeros(0, dtype=np.int64)
        self._map.note_units(reply.inflight)
        if (reply.state == STORED).any():
            self._map.force_sync = True
        return reply.state != READ_IT, reply.spares


def _answered(ref: Any) -> bool:
    """Return True once the actor has answered a ``wait_cached`` call (``ref``)."""
    try:
        return bool(ray.wait([ref], timeout=0)[0])
    except Exception:  # the ray.get after it reports what went wrong
        return True
