"""Preloading: Ray tasks read provider items into chunks that the cache owns.

The directory actor submits the tasks, so it owns their returns (the chunks) and they
outlive the trainer that asked for the preload. Each task reads one unit of indices
with a few threads (I/O-bound providers need many reads in flight) and several tasks
run at once (CPU-bound providers need every core, which threads in one trainer process
cannot give). ``preload_threads`` bounds the reads in flight over all tasks together,
the meaning Hyrax gives the knob.
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

from raycache.chunk import Chunk
from raycache.provider import load_provider, read_raw
from raycache.values import copy_item

__all__ = ["PreloadRun", "read_unit"]

logger = logging.getLogger(__name__)

# Task returns under 100 KiB are inlined into the owner's heap and copied into every
# reader; chunks smaller than this are put into the shared store again by the actor.
INLINE_LIMIT = 100 * 1024


def _read_one(provider: Any, idx: int) -> tuple[int, Any, str | None]:
    try:
        return idx, copy_item(read_raw(provider, idx)), None
    except Exception as exc:  # reported with its index; the other items go on
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return idx, None, detail


def _release_heap() -> None:
    """Return freed heap memory to the OS (glibc only; elsewhere nothing to do)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@ray.remote(num_returns=2, max_retries=0)
def read_unit(
    provider_blob: bytes, provider_key: str, indices: np.ndarray, threads: int
) -> tuple[Chunk, dict]:
    """Read ``indices`` from the provider and return them as one chunk.

    Parameters
    ----------
    provider_blob : bytes
        The pickled provider.
    provider_key : str
        Identifies the blob, so a worker process unpickles each provider once.
    indices : np.ndarray
        Provider indices to read.
    threads : int
        Reads in flight at once inside this task.

    Returns
    -------
    tuple[Chunk, dict]
        The chunk, and a small summary ``{"indices", "nbytes", "errors", "seconds"}``
        that the actor reads without fetching the chunk.
    """
    start = time.monotonic()
    provider = load_provider(provider_key, provider_blob)
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
    # malloc arenas, whose freed pages glibc keeps resident after the task (measured
    # 20-60 MB per preload worker for 48 MB units): give them back now.
    del results, good
    _release_heap()
    summary = {
        "indices": chunk.indices,
        "nbytes": chunk.nbytes,
        "errors": errors,
        "seconds": time.monotonic() - start,
    }
    return chunk, summary


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
    unit : int
        Items per task (the chunk size).
    missing : Callable[[np.ndarray], np.ndarray]
        Returns the subset of indices not cached yet (called under the actor's lock).
    add_chunk : Callable[[ray.ObjectRef, dict], bool]
        Registers a finished chunk; returns False when the byte budget is full.
    """

    def __init__(
        self,
        length: int,
        provider_blob: bytes,
        threads: int,
        unit: int,
        missing: Callable[[np.ndarray], np.ndarray],
        add_chunk: Callable[[Any, dict], bool],
        on_progress: Callable[[int, float], None] | None = None,
    ):
        self.length = length
        self.unit = unit
        self.threads = threads
        # Total, not available, CPUs: tasks that just finished may still be counted as busy.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.tasks = max(1, min(threads, cpus, math.ceil(length / unit)))
        self.threads_per_task = max(1, math.ceil(threads / self.tasks))
        self._blob_ref = ray.put(provider_blob)
        self._key = uuid.uuid4().hex
        self._missing = missing
        self._add_chunk = add_chunk
        self._on_progress = on_progress
        self.state = "running"
        self.errors: list[dict] = []
        self.loaded = 0
        self.started = time.time()
        self.finished: float | None = None
        self.inflight: dict[int, Any] = {}  # unit number -> summary ref
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

    def _drive(self) -> None:
        units = iter(range(math.ceil(self.length / self.unit)))
        pending: dict[Any, tuple[int, Any, np.ndarray]] = {}  # summary ref -> unit info
        budget_full = False
        while True:
            while len(pending) < self.tasks and not self._stop.is_set() and not budget_full:
                k = next(units, None)
                if k is None:
                    break
                todo = self._missing(
                    np.arange(k * self.unit, min((k + 1) * self.unit, self.length))
                )
                if not len(todo):
                    continue
                chunk_ref, summary_ref = read_unit.remote(
                    self._blob_ref, self._key, todo, self.threads_per_task
                )
                pending[summary_ref] = (k, chunk_ref, todo)
                self.inflight[k] = summary_ref
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for summary_ref in ready:
                k, chunk_ref, todo = pending.pop(summary_ref)
                try:
                    summary = ray.get(summary_ref)
                except Exception as exc:  # the task died (worker crash, OOM, cancelled)
                    detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    logger.error(
                        "raycache preload could not read indices %d..%d (%d items): %s",
                        todo[0],
                        todo[-1],
                        len(todo),
                        detail,
                    )
                    self.errors += [{"index": int(i), "error": detail} for i in todo]
                    self.inflight.pop(k, None)
                    continue
                self._record(summary["errors"])
                if len(summary["indices"]) and not self._stop.is_set():
                    if not self._add_chunk(chunk_ref, summary):
                        budget_full = True
                    self.loaded += len(summary["indices"])
                    if self._on_progress is not None:
                        self._on_progress(len(summary["indices"]), summary["seconds"])
                self.inflight.pop(k, None)

    def _record(self, errors: list) -> None:
        for idx, detail in errors:
            logger.error("raycache preload could not read index %s: %s", idx, detail)
            self.errors.append({"index": idx, "error": detail})
