"""A preload that builds each chunk on the node whose trainers will read it.

``LocalityRun`` stands in for ``raycache.preload.PreloadRun`` in the directory actor
when the cache has a ``LocalityPlan``: one Ray generator task per node of the plan,
pinned there (``NodeAffinitySchedulingStrategy``, soft: a node that is gone lets the
task run elsewhere rather than fail), reads that node's indices into chunks. A task's
yielded chunk is stored in the object store of the node it ran on and owned by the
actor, so after the preload each node holds the chunks its trainers read and a warm
epoch there crosses no network. Chunks under Ray's inline limit (100 KiB) are the
exception: they live with the directory actor wherever it runs.

The reading itself is ``raycache.preload.task.read_units``; the units are cut inside the
task from the node's indices, so no unit needs a call to the actor. Guarantees: every
index of the plan not cached at the start is read once, or reported in ``errors``;
``done_event`` is set however the run ends.
"""

from __future__ import annotations

import logging
import math
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raycache.chunk import Chunk, chunk_rows
from raycache.locality import LocalityPlan
from raycache.preload.progress import Progress
from raycache.preload.slot_results import next_unit, task_error
from raycache.preload.task import load_boxed_provider, read_units, unbox
from raycache.preload.units import PROBE_ITEMS, index_runs
from raycache.protocol import HELD, READ_IT, STORED

__all__ = ["LocalityRun", "NodeUnits", "read_node_task"]

logger = logging.getLogger(__name__)

_EMPTY = np.zeros(0, dtype=np.int64)


class NodeUnits:
    """Cuts one node's indices into units, sized as ``read_units`` reports them done.

    Parameters
    ----------
    indices : numpy.ndarray
        The node's indices still to read, in order.
    chunk_size : int or None
        Most items per unit; None: by bytes, after a first unit of ``PROBE_ITEMS``.
    chunk_bytes : int
        Most bytes per unit.
    """

    def __init__(self, indices: np.ndarray, chunk_size: int | None, chunk_bytes: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.rows = PROBE_ITEMS if chunk_size is None else chunk_rows(chunk_size, chunk_bytes, None)
        self.next = 0  # position of the next unit's first index
        self.units = 0

    def claim(self, done: tuple | None) -> tuple | None:
        """Return the next ``(key, indices)``, or None; ``done`` sizes it (see ``read_units``)."""
        if done is not None and done[0]:
            self.rows = chunk_rows(self.chunk_size, self.chunk_bytes, done[1] / done[0])
        if self.next >= len(self.indices):
            return None
        unit = self.indices[self.next : self.next + self.rows]
        self.next += len(unit)
        self.units += 1
        return self.units - 1, unit


@ray.remote(max_retries=0)
def read_node_task(
    provider_box: list,
    provider_key: str,
    indices_box: list,
    threads: int,
    chunk_size: int | None,
    chunk_bytes: int,
    item_timeout: float | None = None,
) -> Iterator[Chunk | dict]:
    """Ray generator task: read one node's ``indices`` into chunks stored on that node.

    Parameters
    ----------
    provider_box : list
        ``[ray.put(provider_blob)]``: the pickled provider's ref, in a list so that the
        task can let go of it (``raycache.preload.task.load_boxed_provider``).
    provider_key : str
        Identifies the preload run (see ``raycache.provider.load_provider``).
    indices_box : list
        ``[ray.put(indices)]``: the node's indices to read, boxed like the provider.
    threads : int
        Reads in flight at once.
    chunk_size : int or None
        ``raycache.chunk_size``.
    chunk_bytes : int
        ``raycache.chunk_bytes``.
    item_timeout : float, optional
        ``raycache.preload_item_timeout_s`` (see ``raycache.preload.task.read_units``).

    Yields
    ------
    Chunk or dict
        For each unit its chunk, then its summary (see ``read_units``).
    """
    provider = load_boxed_provider(provider_key, provider_box)
    units = NodeUnits(unbox(indices_box), chunk_size, chunk_bytes)
    yield from read_units(
        provider, units.claim, threads, reuse_columns=True, item_timeout=item_timeout
    )


class LocalityRun:
    """One preload of a cache that follows a ``LocalityPlan``; ``PreloadRun``'s interface.

    Parameters
    ----------
    plan : LocalityPlan
        One node per index.
    length, provider_blob, threads, chunk_size, chunk_bytes, cpus_per_task, directory,
    missing, add_chunk, on_progress
        As for ``raycache.preload.PreloadRun`` (``directory`` is not used: the units
        are cut inside the tasks).
    """

    def __init__(self, plan: LocalityPlan, **run: Any):
        self.plan = plan
        self.key = uuid.uuid4().hex
        self.progress = Progress()
        self.done_event = threading.Event()
        self.inflight: dict[int, int] = {}
        self.units = 0
        self._stopped = threading.Event()
        self._missing: Callable[[np.ndarray], np.ndarray] = run["missing"]
        self._add_chunk: Callable[[Any, dict], bool] = run["add_chunk"]
        self._on_progress = run.get("on_progress")
        self._run = run
        nodes = len(plan.node_ids)
        self.threads_per_task = max(1, math.ceil(int(run["threads"]) / nodes))
        # Per node: its indices not cached at the start, and how many have come back.
        self._todo = {n: self._missing(plan.indices_on(n)) for n in plan.node_ids}
        self._back = dict.fromkeys(plan.node_ids, 0)
        self._unit_rows = PROBE_ITEMS
        self._publish()
        self._thread = threading.Thread(target=self._drive, name="raycache-locality", daemon=True)
        self._thread.start()

    def status(self) -> dict:
        """Return ``Progress.status`` and ``tasks``, ``threads_per_task``, ``units``, ``nodes``."""
        left = sum(len(t) - self._back[n] for n, t in self._todo.items())
        status = self.progress.status(left)
        status.update(
            tasks=len(self._todo),
            threads_per_task=self.threads_per_task,
            units=self.units,
            reserved=0,
            nodes={n: len(t) for n, t in self._todo.items()},
        )
        return status

    def stop(self) -> None:
        """Register no more chunks; the tasks' reads end and are discarded."""
        self._stopped.set()

    def claim(self, done: tuple | None) -> None:
        """No unit is handed out by the actor in this run (the tasks cut their own)."""
        return None

    def is_reading(self, idx: int) -> bool:
        """Return True if ``idx`` is in a node's unit being read now."""
        return any(start <= idx < stop for start, stop in list(self.inflight.items()))

    def reserve(self, client_id: str, indices: np.ndarray, spares: int = 0) -> tuple:
        """Tell a trainer which misses to wait for (being read) and which to read.

        Returns
        -------
        tuple
            ``(state, spare_indices)`` as ``PreloadRun.reserve``; no spares are given.
        """
        state = np.full(len(indices), READ_IT, dtype=np.int8)
        for start, stop in list(self.inflight.items()):
            state[(indices >= start) & (indices < stop)] = HELD
        state[~np.isin(indices, self._missing(indices))] = STORED
        return state, _EMPTY

    def release(self, client_id: str, indices: np.ndarray | None = None) -> None:
        """Nothing is reserved in this run: nothing to release."""

    def _publish(self) -> None:
        """Rebuild ``inflight``: per node, the next two units' worth of indices."""
        spans: dict[int, int] = {}
        for node, todo in self._todo.items():
            back = self._back[node]
            for start, stop in index_runs(np.sort(todo[back : back + 2 * self._unit_rows])):
                spans[start] = max(stop, spans.get(start, stop))
        self.inflight = spans

    def _start(self) -> dict:
        run = self._run
        blob = ray.put(run["provider_blob"])
        slots = {}
        for node, todo in self._todo.items():
            if not len(todo):
                continue
            task = read_node_task.options(
                num_cpus=float(run["cpus_per_task"]),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            )
            # Refs inside lists, which the task empties: a bare ref argument (or a large
            # array, which Ray stores for the call) stays stored if this actor dies.
            args = ([blob], self.key, [ray.put(todo)], self.threads_per_task, run["chunk_size"])
            slots[task.remote(*args, int(run["chunk_bytes"]), run.get("item_timeout_s"))] = node
        return slots

    def _drive(self) -> None:
        try:
            slots = self._start()
            while slots and not self._stopped.is_set():
                # No fetch: each chunk stays on the node that built it, not the actor's.
                ready, _ = ray.wait(list(slots), num_returns=1, timeout=1.0, fetch_local=False)
                for slot in ready:
                    if not self._take(slot, slots[slot]):
                        del slots[slot]
            self.progress.state = "done" if not self.progress.errors else "done_with_errors"
        except Exception:  # the actor must learn of it; never leave waiters hanging
            logger.exception("raycache locality preload failed")
            self.progress.errors.append({"index": None, "error": traceback.format_exc(limit=3)})
            self.progress.state = "failed"
        finally:
            self.inflight = {}
            self.progress.end()
            self.done_event.set()

    def _take(self, slot: Any, node: str) -> bool:
        """Register the next chunk node ``node``'s task yielded; False once it has ended."""
        try:
            unit = next_unit(slot)
        except Exception as exc:  # the task failed: what it had left is not preloaded
            todo = self._todo[node][self._back[node] :]
            detail = f"the preload task on node {node} failed: {task_error(exc)}"
            logger.error("raycache locality preload: %s (%d items left)", detail, len(todo))
            self.progress.errors += [{"index": int(i), "error": detail} for i in todo]
            return False
        if unit is None:
            return False
        chunk_ref, summary, _ = unit
        return self._register(chunk_ref, summary, node)

    def _register(self, chunk_ref: Any, summary: dict, node: str) -> bool:
        """Hand one unit's chunk to the cache; False when the byte budget is full."""
        for idx, detail in summary["errors"]:
            self.progress.errors.append({"index": idx, "error": detail})
        rows = len(summary["indices"]) + len(summary["errors"])
        self._back[node] += rows
        self.units += 1
        if rows:
            self._unit_rows = max(self._unit_rows, rows)
        count = len(summary["indices"])
        room = True
        if count and not self._stopped.is_set():
            room = self._add_chunk(chunk_ref, summary)
            self.progress.stored(count, summary["nbytes"])
            if self._on_progress is not None:
                self._on_progress(count, summary["seconds"])
        self._publish()
        if not room:
            self.stop()
        return room
