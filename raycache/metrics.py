"""Cache metrics written with tensorboardX, under the names Hyrax's DataCache uses.

Each process writes its own event file (the directory actor too), so many trainers
logging to one ``log_dir`` never write into the same file.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from raycache.values import data_size

__all__ = ["Metrics", "ReadMetrics"]


class Metrics:
    """A thread-safe scalar logger with a step counter per metric name.

    Parameters
    ----------
    log_dir : str
        The tensorboardX log directory.
    tag : str
        Sub-directory for this writer (for example the client or actor name).
    """

    def __init__(self, log_dir: str, tag: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(
            logdir=os.path.join(log_dir, tag), filename_suffix=f".{os.getpid()}", flush_secs=5
        )
        self._steps: dict[str, int] = {}
        self._lock = threading.Lock()

    def scalar(self, name: str, value: float) -> None:
        """Log one value of metric ``name``.

        Parameters
        ----------
        name : str
            For example ``"DataCache/cache_insert_s"``.
        value : float
            The value.
        """
        with self._lock:
            step = self._steps.get(name, 0)
            self._steps[name] = step + 1
        self._writer.add_scalar(name, value, global_step=step, walltime=time.time())

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class ReadMetrics:
    """One process's ``DataCache`` metrics: mean hit, miss and insert times, inserts.

    The count and total time of each kind of call are kept from the start (``summary``,
    for ``stats()``); the scalars are written only once ``open`` is called.

    Parameters
    ----------
    interval : Callable[[], int]
        Returns how many samples are averaged into one logged value (Hyrax's
        ``DataCache.logging_interval``, which a user may change at any time).
    """

    _NAMES = {"hit": "hit_s", "miss": "miss_s", "insert": "cache_insert_s"}

    def __init__(self, interval: Callable[[], int]):
        self._interval = interval
        self._writer: Metrics | None = None
        self._samples: dict[str, list[float]] = {"hit": [], "miss": [], "insert": []}
        self._totals: dict[str, list[float]] = {what: [0, 0.0] for what in self._NAMES}
        self._inserts = 0
        self._insert_bytes = 0

    def open(self, log_dir: str, tag: str) -> None:
        """Start writing to ``log_dir`` under ``tag``."""
        self._writer = Metrics(log_dir, tag)

    def timed(self, what: str, start: float) -> None:
        """Record one ``"hit"``, ``"miss"`` or ``"insert"`` that began at ``start``.

        Parameters
        ----------
        what : str
            The kind of call.
        start : float
            Its ``time.perf_counter()`` at the start.
        """
        elapsed = time.perf_counter() - start
        total = self._totals[what]
        total[0] += 1
        total[1] += elapsed
        if self._writer is None:
            return
        samples = self._samples[what]
        samples.append(elapsed)
        if len(samples) >= self._interval():
            self._writer.scalar(f"DataCache/{self._NAMES[what]}", sum(samples) / len(samples))
            samples.clear()

    def summary(self) -> dict[str, float | None]:
        """Return the mean seconds of each kind of call so far, under the scalars' names.

        Returns
        -------
        dict
            ``hit_s``, ``miss_s`` and ``cache_insert_s``: the mean duration of this
            process's reads that were hits, reads with a miss, and inserts (None before
            the first of its kind), as ``DataCache/hit_s`` and the others average them.
        """
        return {
            name: (total[1] / total[0] if total[0] else None)
            for what, name in self._NAMES.items()
            for total in (self._totals[what],)
        }

    def inserted(self, data: Any) -> None:
        """Count one inserted item; log the count and bytes every ``interval`` inserts."""
        self._inserts += 1
        if self._writer is None:
            return
        self._insert_bytes += data_size(data)
        if self._inserts % self._interval() == 0:
            self._writer.scalar("DataCache/cache_count", self._inserts)
            self._writer.scalar("DataCache/cache_bytes", self._insert_bytes)

    def close(self) -> None:
        """Close the event file, if one is open."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
