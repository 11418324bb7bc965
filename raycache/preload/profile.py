"""Where a preload's time goes: per unit on the task side, per run on the actor side.

A preload task times the parts of each unit it reads (``UnitTimes``) and sends them in
the unit's summary; the directory actor sums them over the run (``RunProfile``) and
shows the totals in ``stats()["preload"]["profile"]``. The figures answer the questions
a slow preload raises: did the tasks start late (``start_s``), did the slots wait for
the actor (``claim_s``), for the reads (``wait_s``: the provider's own time as the task
saw it), for packing the chunk (``build_s``) or for copying it into the object store
(``put_s``), and how long the actor took to register what came back (``register_s``).
Timing costs a few ``time.monotonic`` calls per unit, never per item.

Stamps that cross processes (a task's start) use ``time.time``: the tasks of a run and
its actor share the node's clock only on one node, so ``start_s`` is the latest first
unit's start seen by the actor, which a task on another node may skew by its clock
offset; the sums of durations do not depend on clocks agreeing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["PARTS", "RunProfile", "UnitTimes"]

# The per-unit parts a task times, in the order a unit goes through them.
PARTS = ("claim_s", "wait_s", "build_s", "put_s")


@dataclass
class UnitTimes:
    """Seconds one preload slot spent on each part of its units since the last summary.

    ``began`` is the wall-clock time the slot's task started (set on the first unit's
    times only, then None), so the actor can tell how long tasks took to start.
    """

    claim_s: float = 0.0
    wait_s: float = 0.0
    build_s: float = 0.0
    put_s: float = 0.0
    began: float | None = None

    def add(self, part: str, since: float) -> float:
        """Add the seconds from monotonic ``since`` to now to ``part``; return now.

        Parameters
        ----------
        part : str
            One of ``PARTS``.
        since : float
            ``time.monotonic()`` when the part began.

        Returns
        -------
        float
            ``time.monotonic()`` now, where the next part begins.
        """
        now = time.monotonic()
        setattr(self, part, getattr(self, part) + now - since)
        return now

    def take(self) -> dict:
        """Return the times as a dict and start again from zero.

        Returns
        -------
        dict
            ``PARTS`` -> seconds, and ``began`` when it was set.
        """
        out = {part: getattr(self, part) for part in PARTS}
        if self.began is not None:
            out["began"] = self.began
        for part in PARTS:
            setattr(self, part, 0.0)
        self.began = None
        return out


@dataclass
class RunProfile:
    """The sums of a run's unit times, and when its tasks started, on the actor's side.

    Parameters
    ----------
    started : float
        Wall-clock time the run started (``time.time()``).
    """

    started: float = field(default_factory=time.time)
    units: int = 0
    items: int = 0
    first_task_s: float | None = None  # run start -> the first task's start
    last_task_s: float | None = None  # run start -> the latest first-unit task start
    first_chunk_s: float | None = None  # run start -> the first chunk registered
    register_s: float = 0.0  # the actor's time registering chunks
    parts: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    def unit(self, times: dict | None, items: int, register_s: float) -> None:
        """Add one unit's times (from its summary) and the actor's time to register it.

        Parameters
        ----------
        times : dict or None
            ``UnitTimes.take``'s dict, or None from a task that sent none.
        items : int
            Items the unit stored.
        register_s : float
            Seconds the actor spent fetching the summary and registering the chunk.
        """
        self.units += 1
        self.items += items
        self.register_s += register_s
        if self.first_chunk_s is None:
            self.first_chunk_s = time.time() - self.started
        if not times:
            return
        for part in PARTS:
            self.parts[part] += float(times.get(part, 0.0))
        if "began" in times:
            start = max(0.0, float(times["began"]) - self.started)
            first, last = self.first_task_s, self.last_task_s
            self.first_task_s = start if first is None else min(first, start)
            self.last_task_s = start if last is None else max(last, start)

    def report(self) -> dict:
        """Return the profile for ``stats()["preload"]["profile"]``.

        Returns
        -------
        dict
            ``units``, ``items``; ``first_task_s`` and ``last_task_s`` (from the run's
            start to the first and the last task's start), ``first_chunk_s``;
            ``register_s`` (the actor's part); the tasks' summed ``claim_s``, ``wait_s``,
            ``build_s`` and ``put_s``; and ``per_item_us`` / ``per_unit_ms``: the
            tasks' own parts (all but ``wait_s``) per item and per unit.
        """
        own = sum(v for k, v in self.parts.items() if k != "wait_s")
        return {
            "units": self.units,
            "items": self.items,
            "first_task_s": self.first_task_s,
            "last_task_s": self.last_task_s,
            "first_chunk_s": self.first_chunk_s,
            "register_s": self.register_s,
            **self.parts,
            "per_item_us": 1e6 * own / self.items if self.items else None,
            "per_unit_ms": 1e3 * own / self.units if self.units else None,
        }
