"""Preloading: Ray tasks read provider items into chunks that the cache owns.

The directory actor submits the tasks, a range of indices (a unit) each, and registers
the chunk each returns; it owns the returns, so they outlive the trainer that asked for
the preload. Several tasks run at once (CPU-bound providers need every core, which
threads in one trainer process cannot give) and each reads its unit with a few threads
(I/O-bound providers need many reads in flight). ``preload_threads`` bounds the reads in
flight over all tasks together, the meaning Hyrax gives the knob.

Units are sized for the run, not only for storage: a unit holds at most one chunk's
worth of items, and fewer as the run nears its end (each is a share of what is left,
but not less than ~0.05 s of reading at the last unit's pace), so that the tasks finish
together and a trainer that needs an item being read waits for a short unit, while a
fast provider still fills whole chunks (fewer chunks: faster shuffled reads).

When ``chunk_size`` is unset, the first unit of each task slot is a small probe that
tells how many bytes an item takes; the largest mean item size of any unit read so far
sizes the next units, so items that grow along the dataset overfill only the units
sized before a unit of bigger items came back.

Reader processes kept as actors for the run and killed after it (which returns the
memory a provider costs a process) were tried and measured slower: starting an actor
took ~1 s here, longer than a whole preload of the benchmarks (docs/design.md).
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk, chunk_rows
from raycache.provider import load_provider, read_raw
from raycache.values import check_item

__all__ = ["PreloadRun", "read_unit", "read_unit_task"]

logger = logging.getLogger(__name__)

# Task returns under 100 KiB are inlined into the owner's heap and copied into every
# reader; chunks smaller than this are put into the shared store again by the actor.
INLINE_LIMIT = 100 * 1024
PROBE_ITEMS = 32  # first unit of each task slot when the chunk size is learned from bytes
MIN_UNIT_ITEMS = 64  # below this a unit's fixed cost (a call, a chunk) dominates
UNITS_PER_SLOT = 2  # a unit is at most 1 / (task slots * this) of what is left ...
MIN_UNIT_S = 0.05  # ... unless that would take less than this to read
STARTUP_WARNING_S = 30.0  # no unit back after this long: say why it may be stuck


def _read_one(provider: Any, idx: int) -> tuple[int, Any, str | None]:
    try:
        item = read_raw(provider, idx)
        check_item(item)  # the chunk copies the arrays; no private copy needed here
        return idx, item, None
    except Exception as exc:  # reported with its index; the other items go on
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return idx, None, detail


def _release_heap() -> None:
    """Return freed heap memory to the OS (glibc only; elsewhere nothing to do)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_unit(provider: Any, indices: np.ndarray, threads: int) -> tuple[Chunk, dict]:
    """Read ``indices`` from the provider and return them as one chunk.

    Parameters
    ----------
    provider : Any
        The provider.
    indices : np.ndarray
        Provider indices to read.
    threads : int
        Reads in flight at once.

    Returns
    -------
    tuple[Chunk, dict]
        The chunk, and a small summary ``{"indices", "nbytes", "errors", "seconds"}``
        that the directory actor reads without fetching the chunk.
    """
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda i: _read_one(provider, int(i)), indices))
    good = [(i, item) for i, item, err in results if err is None]
    errors = [(i, err) for i, _, err in results if err is not None]
    try:
        chunk = Chunk.from_rows([i for i, _ in good], [item for _, item in good])
    except Exception as exc:  # items that cannot share a chunk: report, do not hang
        detail = f"{type(exc).__name__}: {exc}"
        errors += [(i, detail) for i, _ in good]
        chunk = Chunk.from_rows([], [])
    # The items are copied into the chunk. Reader threads allocated them in their own
    # malloc arenas, whose freed pages glibc keeps resident: give them back now.
    del results, good
    _release_heap()
    summary = {
        "indices": chunk.indices,
        "nbytes": chunk.nbytes,
        "errors": errors,
        "seconds": time.monotonic() - start,
    }
    return chunk, summary


@ray.remote(num_returns=2, max_retries=0)
def read_unit_task(
    provider_blob: bytes, provider_key: str, indices: np.ndarray, threads: int
) -> tuple[Chunk, dict]:
    """Ray task: unpickle the provider (once per worker process and run), read a unit.

    Parameters
    ----------
    provider_blob : bytes
        The pickled provider.
    provider_key : str
        Identifies the preload run (see ``raycache.provider.load_provider``).
    indices : np.ndarray
        Provider indices to read.
    threads : int
        Reads in flight at once.

    Returns
    -------
    tuple[Chunk, dict]
        See ``read_unit``.
    """
    return read_unit(load_provider(provider_key, provider_blob), indices, threads)


class PreloadRun:
    """One preload of a cache, driven by a thread inside the directory actor.

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
    missing : Callable[[np.ndarray], np.ndarray]
        Returns the subset of indices not cached yet (called under the actor's lock).
    add_chunk : Callable[[ray.ObjectRef, dict], bool]
        Registers a finished chunk; returns False when the byte budget is full.
    on_progress : Callable[[int, float], None], optional
        Called with the item count and seconds of each finished unit.
    """

    def __init__(
        self,
        length: int,
        provider_blob: bytes,
        threads: int,
        chunk_size: int | None,
        chunk_bytes: int,
        cpus_per_task: float,
        missing: Callable[[np.ndarray], np.ndarray],
        add_chunk: Callable[[Any, dict], bool],
        on_progress: Callable[[int, float], None] | None = None,
    ):
        self.length = length
        self.threads = threads
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.cpus_per_task = float(cpus_per_task)
        # Total, not available, CPUs: tasks that just finished may still be counted as busy.
        cpus = max(1, math.ceil(ray.cluster_resources().get("CPU", 1)))
        self.tasks = max(1, min(threads, cpus, math.ceil(length / MIN_UNIT_ITEMS)))
        self.threads_per_task = max(1, math.ceil(threads / self.tasks))
        # Rows per unit: known up front from chunk_size, else after the first unit.
        self.unit_rows: int | None = (
            None if chunk_size is None else chunk_rows(chunk_size, chunk_bytes, None)
        )
        self._blob_ref = ray.put(provider_blob)
        self._key = uuid.uuid4().hex
        self._missing = missing
        self._add_chunk = add_chunk
        self._on_progress = on_progress
        self.state = "running"
        self.errors: list[dict] = []
        self.loaded = 0
        self.units = 0
        self._item_bytes = 0.0  # largest mean item size of a unit so far
        self._rows_per_s = 0.0  # how fast the last unit was read
        self.started = time.time()
        self.finished: float | None = None
        self.inflight: dict[int, tuple[int, Any]] = {}  # unit start -> (stop, summary ref)
        self.done_event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycache-preload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop submitting units; units in flight finish and are discarded."""
        self._stop.set()

    def status(self) -> dict:
        """Return the run's progress, errors and timing."""
        end = self.finished or time.time()
        return {
            "state": self.state,
            "loaded": self.loaded,
            "errors": list(self.errors),
            "tasks": self.tasks,
            "threads_per_task": self.threads_per_task,
            "units": self.units,
            "seconds": end - self.started,
        }

    def _run(self) -> None:
        try:
            self._drive()
            self.state = "done" if not self.errors else "done_with_errors"
        except Exception:  # the actor must learn of it; never leave waiters hanging
            logger.exception("raycache preload failed")
            self.errors.append({"index": None, "error": traceback.format_exc(limit=3)})
            self.state = "failed"
        finally:
            self.inflight.clear()
            self.finished = time.time()
            self.done_event.set()

    def _unit_size(self, remaining: int) -> int:
        if self.unit_rows is None:
            return min(remaining, PROBE_ITEMS)
        share = math.ceil(remaining / (self.tasks * UNITS_PER_SLOT))
        # Shrinking pays only where a unit takes long: a fast provider keeps full chunks.
        floor = max(MIN_UNIT_ITEMS, int(self._rows_per_s * MIN_UNIT_S))
        return min(remaining, self.unit_rows, max(share, floor))

    def _drive(self) -> None:
        next_start = 0
        pending: dict[Any, tuple[int, Any, np.ndarray]] = {}  # summary ref -> unit
        budget_full = False
        last_news = time.monotonic()
        warned = False
        task = read_unit_task.options(num_cpus=self.cpus_per_task)
        while True:
            while len(pending) < self.tasks and not self._stop.is_set() and not budget_full:
                if next_start >= self.length:
                    break
                if self.unit_rows is None and pending and self.units >= self.tasks:
                    break  # the probes are out: size the next units from their bytes
                stop = next_start + self._unit_size(self.length - next_start)
                todo = self._missing(np.arange(next_start, stop))
                start, next_start = next_start, stop
                if not len(todo):
                    continue
                chunk_ref, summary_ref = task.remote(
                    self._blob_ref, self._key, todo, self.threads_per_task
                )
                pending[summary_ref] = (start, chunk_ref, todo)
                self.inflight[start] = (stop, summary_ref)
                self.units += 1
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready and not warned and time.monotonic() - last_news > STARTUP_WARNING_S:
                warned = True
                logger.warning(
                    "raycache preload: no unit finished in %.0f s; if trainers hold every "
                    "CPU, the preload tasks (raycache.preload_cpus=%g each) cannot start",
                    STARTUP_WARNING_S,
                    self.cpus_per_task,
                )
            for summary_ref in ready:
                last_news = time.monotonic()
                start, chunk_ref, todo = pending.pop(summary_ref)
                if not self._finish(chunk_ref, summary_ref, todo):
                    budget_full = True
                self.inflight.pop(start, None)

    def _finish(self, chunk_ref: Any, summary_ref: Any, todo: np.ndarray) -> bool:
        """Record one unit's result; False once the byte budget is full."""
        try:
            summary = ray.get(summary_ref)
        except Exception as exc:  # the task died (worker crash, out of memory, cancelled)
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.error(
                "raycache preload could not read indices %d..%d (%d items): %s",
                todo[0],
                todo[-1],
                len(todo),
                detail,
            )
            self.errors += [{"index": int(i), "error": detail} for i in todo]
            return True
        for idx, detail in summary["errors"]:
            logger.error("raycache preload could not read index %s: %s", idx, detail)
            self.errors.append({"index": idx, "error": detail})
        count = len(summary["indices"])
        if count:
            self._rows_per_s = count / max(summary["seconds"], 1e-3)
            # Items may differ in size: the largest unit mean so far sizes the next units.
            self._item_bytes = max(self._item_bytes, summary["nbytes"] / count)
            self.unit_rows = chunk_rows(self.chunk_size, self.chunk_bytes, self._item_bytes)
        if not count or self._stop.is_set():
            return True
        room = self._add_chunk(chunk_ref, summary)
        self.loaded += count
        if self._on_progress is not None:
            self._on_progress(count, summary["seconds"])
        return room
