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

    Until ``open`` is called it records nothing, at the cost of one call per read.

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
        if self._writer is None:
            return
        samples = self._samples[what]
        samples.append(time.perf_counter() - start)
        if len(samples) >= self._interval():
            self._writer.scalar(f"DataCache/{self._NAMES[what]}", sum(samples) / len(samples))
            samples.clear()

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
