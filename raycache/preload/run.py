"""The preload's actor side: one run's slots started, their chunks registered, its progress.

``PreloadRun`` lives in the directory actor. A thread of its own starts the generator
tasks (``raycache.preload.task``), one per slot, and registers each chunk they yield
through the injected ``add_chunk``; the unit scheduler (``raycache.preload.units``)
decides what each slot reads and what trainers may reserve. The run guarantees:

- Every unit handed out is accounted for: registered, reported failed with its indices
  (its task died), or discarded after ``stop``.
- Items trainers reserved and never stored are read after the range by one more slot,
  so the run ends with everything either cached or in ``errors``.
- ``done_event`` is set when the run ends, however it ends, so nobody waits on it for
  ever; ``status`` never takes the scheduler's lock (the actor calls it under its own).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from raycache.preload.failures import FailureLog
from raycache.preload.profile import RunProfile
from raycache.preload.progress import Progress
from raycache.preload.slot_results import next_unit, task_error
from raycache.preload.task import read_units_task
from raycache.preload.units import MIN_UNIT_ITEMS, UnitScheduler

__all__ = ["PreloadRun"]

logger = logging.getLogger(__name__)

STARTUP_WARNING_S = 30.0  # no unit back after this long: say why it may be stuck
RESERVED_POLL_S = 0.02  # how often the end of a run looks for reserved items being stored


def slot_count(threads: int, cpus: float, length: int) -> int:
    """Return how many preload tasks to run at once.

    Parameters
    ----------
    threads : int
        ``preload_threads``: reads in flight over all tasks.
    cpus : float
        CPUs of the Ray cluster.
    length : int
        Number of provider items.

    Returns
    -------
    int
        At least 1, at most one per thread, per CPU and per ``MIN_UNIT_ITEMS`` items.
    """
    return max(1, min(threads, max(1, math.ceil(cpus)), math.ceil(length / MIN_UNIT_ITEMS)))


class PreloadRun:
    """One preload of a cache, driven by a thread inside the directory actor.

    ``tasks`` generator tasks (one per slot) each read units that ``claim`` hands out
    and yield a chunk per unit; the driving thread registers each chunk as it comes.

    Parameters
    ----------
    length : int
        Number of provider items.
    provider_blob : bytes
        The pickled provider.
    threads : int
        ``preload_threads``: reads in flight over all tasks.
    chunk_size : int or None
        ``raycache.chunk_size``: most items per unit (and chunk); None: by bytes.
    chunk_bytes : int
        ``raycache.chunk_bytes``: most bytes per unit (and chunk).
    cpus_per_task : float
        ``raycache.preload_cpus``: CPUs each task reserves.
    directory : ray.actor.ActorHandle
        The directory actor, whose ``preload_claim`` the tasks call (it calls ``claim``).
    missing : Callable[[np.ndarray], np.ndarray]
        Returns the subset of indices not cached yet (called under the scheduler's lock).
    add_chunk : Callable[[ray.ObjectRef, dict], bool]
        Registers a finished chunk; returns False when the byte budget is full.
    on_progress : Callable[[int, float], None], optional
        Called with the item count and seconds of each finished unit.
    item_timeout_s : float, optional
        ``raycache.preload_item_timeout_s``: seconds one read may take before the
        tasks record it as failed and go on; None: no limit.
    stop_on_error : bool
        ``raycache.preload_on_error = "stop"``: hand out no more units once a unit
        comes back with failed reads (its good items are still stored).
    """

    def __init__(
        self,
        length: int,
        provider_blob: bytes,
        threads: int,
        chunk_size: int | None,
        chunk_bytes: int,
        cpus_per_task: float,
        directory: Any,
        missing: Callable[[np.ndarray], np.ndarray],
        add_chunk: Callable[[Any, dict], bool],
        on_progress: Callable[[int, float], None] | None = None,
        item_timeout_s: float | None = None,
        stop_on_error: bool = False,
    ):
        self.length = length
        self.threads = threads
        self.cpus_per_task = float(cpus_per_task)
        self.item_timeout_s = item_timeout_s
        self.stop_on_error = stop_on_error
        # Total, not available, CPUs: tasks that just finished may still be counted as busy.
        self.tasks = slot_count(threads, ray.cluster_resources().get("CPU", 1), length)
        self.scheduler = UnitScheduler(
            length, self.tasks, threads, chunk_size, chunk_bytes, missing
        )
        self.threads_per_task = self.scheduler.threads_per_task
        self._blob_ref = ray.put(provider_blob)
        self.key = uuid.uuid4().hex
        self._directory = directory
        self._add_chunk = add_chunk
        self._on_progress = on_progress
        self.progress = Progress()
        self.profile = RunProfile()
        self.failures = FailureLog(self.progress.errors)  # logs a few, then one summary
        self.task_errors: list[str] = []  # why each failed task failed, in order
        self.done_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycache-preload", daemon=True)
        self._thread.start()

    @property
    def inflight(self) -> dict[int, int]:
        """First index -> end of each span being read (a whole copy, taken without a lock)."""
        return self.scheduler.inflight

    @property
    def units(self) -> int:
        """Units handed out so far."""
        return self.scheduler.units

    def stop(self) -> None:
        """Hand out no more units; units being read finish and are discarded."""
        self.scheduler.stopped.set()

    def is_reading(self, idx: int) -> bool:
        """Return True if ``idx`` belongs to a unit handed out and not registered yet.

        Parameters
        ----------
        idx : int
            The provider index.

        Returns
        -------
        bool
            Whether a trainer should wait for it rather than read it.
        """
        return any(start <= idx < stop for start, stop in list(self.inflight.items()))

    def claim(self, done: tuple | None) -> tuple | None:
        """Hand a slot its next unit (see ``UnitScheduler.claim``).

        Parameters
        ----------
        done : tuple or None
            ``(rows, nbytes, seconds)`` of the slot's last finished unit, or None.

        Returns
        -------
        tuple or None
            ``(key, indices)``: the unit's int key and the int64 indices to read; None
            when no unit is left.
        """
        return self.scheduler.claim(done)

    def reserve(self, client_id: str, indices: np.ndarray, spares: int = 0) -> tuple:
        """Reserve for a trainer the misses no unit holds (see ``UnitScheduler.reserve``).

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray
            Indices the trainer misses.
        spares : int
            Spare items to reserve as well.

        Returns
        -------
        tuple
            ``(state, spare_indices)``.
        """
        return self.scheduler.reserve(client_id, indices, spares)

    def release(self, client_id: str, indices: np.ndarray | None = None) -> None:
        """End ``client_id``'s reservations (on ``indices``, or all): the preload reads them.

        Parameters
        ----------
        client_id : str
            The trainer's client.
        indices : np.ndarray, optional
            The reserved indices it will not read after all; None: all of its own.
        """
        self.scheduler.release(client_id, indices)

    def status(self) -> dict:
        """Return the run's state, progress, errors and timing.

        Returns
        -------
        dict
            ``Progress.status``'s keys (``state``, ``items``, ``loaded``, ``bytes``,
            ``items_per_s``, ``eta_s``, ``errors``, ``error_count``, ``seconds``) and
            ``tasks``, ``threads_per_task``, ``units`` (handed out so far),
            ``reserved`` (live trainer leases; 0 once the run has ended) and
            ``profile`` (where the time went, ``RunProfile.report``).
        """
        running = self.progress.finished is None
        status = self.progress.status(self.scheduler.items_left())
        status.update(
            tasks=self.tasks,
            threads_per_task=self.threads_per_task,
            units=self.scheduler.units,
            reserved=self.scheduler.policy.leases.live_count() if running else 0,
            profile=self.profile.report(),
        )
        return status

    def _run(self) -> None:
        progress = self.progress
        try:
            self._drive()
            progress.state = "done" if not progress.errors else "done_with_errors"
        except _SlotsFailed as exc:
            logger.error("raycache preload failed: %s", exc)
            progress.errors.append({"index": None, "error": str(exc)})
            progress.state = "failed"
        except Exception:  # the actor must learn of it; never leave waiters hanging
            logger.exception("raycache preload failed")
            progress.errors.append({"index": None, "error": traceback.format_exc(limit=3)})
            progress.state = "failed"
        finally:
            self.scheduler.inflight = {}
            self.failures.summarize(self.length, progress.items)
            progress.end()
            self.done_event.set()

    def _start_slots(self, count: int) -> list:
        task = read_units_task.options(num_cpus=self.cpus_per_task)
        # The ref travels inside a list, which the task empties once it has the bytes:
        # a bare ref argument would keep the blob stored after a killed actor (task.py).
        args = ([self._blob_ref], self.key, self._directory, self.threads_per_task)
        args += (self.item_timeout_s,)
        return [task.remote(*args) for _ in range(count)]

    def _drive(self) -> None:
        slots = self._start_slots(self.tasks)
        while True:
            failed_before, started = len(self.task_errors), len(slots)
            self._wait_for_slots(slots)  # empties ``slots``
            # Units handed out but never reported: their slot's task died.
            why = self.task_errors[-1] if self.task_errors else "it ended early"
            for todo in self.scheduler.take_lost():
                self._lost_unit(todo, f"the preload task reading it failed: {why}")
            _check_round(self.task_errors[failed_before:], started, self.scheduler, self.length)
            if not self._await_reserved():
                break
            # Items reserved by a trainer that did not store them: one slot reads them.
            slots = self._start_slots(1)

    def _wait_for_slots(self, slots: list) -> None:
        """Register what the slots yield until every slot has ended."""
        last_news = time.monotonic()
        warned = False
        while slots:
            # fetch_local=False: each chunk stays on the node that built it (a fetching
            # wait would copy every chunk into the actor's node).
            ready, _ = ray.wait(slots, num_returns=1, timeout=1.0, fetch_local=False)
            if not ready and not warned and time.monotonic() - last_news > STARTUP_WARNING_S:
                warned = True
                logger.warning(
                    "raycache preload: no unit finished in %.0f s; if trainers hold every "
                    "CPU, the preload tasks (raycache.preload_cpus=%g each) cannot start",
                    STARTUP_WARNING_S,
                    self.cpus_per_task,
                )
            for slot in ready:
                last_news = time.monotonic()
                if not self._take(slot):
                    slots.remove(slot)

    def _await_reserved(self) -> bool:
        """Wait for the items trainers reserved to be stored; True if some never will be.

        Those (their lease ended, or their client released them) become the units that
        ``claim`` hands out last, but for items the preload has already failed to read.
        """
        stopped = self.scheduler.stopped
        while not stopped.is_set():
            left = self.scheduler.settle_reserved()
            if left is None:
                return False
            if left == 0.0:
                return True
            stopped.wait(min(left, RESERVED_POLL_S))
        return False

    def _take(self, slot: Any) -> bool:
        """Register the next unit a slot yielded; False once the slot has ended."""
        try:
            unit = next_unit(slot)
        except Exception as exc:  # the task raised or died (crash, out of memory, cancelled)
            detail = task_error(exc)
            logger.error("raycache preload task failed: %s", detail)
            self.task_errors.append(detail)
            return False  # its units are reported when the run ends
        if unit is None:
            return False
        chunk_ref, summary, began = unit
        if not self._finish(chunk_ref, summary):
            self.stop()  # the budget is full, or a read failed: hand out no more units
        self.scheduler.registered(summary["unit"])
        stored = len(summary["indices"])
        self.profile.unit(summary.get("times"), stored, time.monotonic() - began)
        return True

    def _lost_unit(self, todo: np.ndarray, detail: str) -> None:
        what = "raycache preload could not read indices %d..%d (%d items): %s"
        logger.error(what, todo[0], todo[-1], len(todo), detail)
        self.scheduler.note_failed(todo.tolist())
        self.failures.failed([(int(i), detail) for i in todo])

    def _finish(self, chunk_ref: Any, summary: dict) -> bool:
        """Record one unit's result; False to stop the run.

        The run stops once the byte budget is full, or at a failed read with
        ``stop_on_error``.
        """
        if summary["errors"]:
            self.scheduler.note_failed([idx for idx, _ in summary["errors"]])
        self.failures.failed(summary["errors"])
        go_on = not (summary["errors"] and self.stop_on_error)  # raycache.preload_on_error
        count = len(summary["indices"])
        if not count or self.scheduler.stopped.is_set():
            return go_on
        room = self._add_chunk(chunk_ref, summary)
        self.progress.stored(count, summary["nbytes"])
        if self._on_progress is not None:
            self._on_progress(count, summary["seconds"])
        return room and go_on


def _check_round(failures: list[str], started: int, scheduler: UnitScheduler, length: int) -> None:
    """Raise ``_SlotsFailed`` if every slot of a round failed with items never handed out.

    No task can read them then (a provider that does not unpickle in Ray's workers,
    typically): starting more would fail the same way.
    """
    unread = length - scheduler.frontier
    if len(failures) == started and unread > 0 and not scheduler.stopped.is_set():
        raise _SlotsFailed(
            f"every preload task failed ({started}), {unread} items never read: {failures[0]}"
        )


class _SlotsFailed(Exception):
    """Every task of a round failed before the range was read: the run cannot go on."""
