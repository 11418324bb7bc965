"""Cache metrics written with tensorboardX, under the names Hyrax's DataCache uses.

Each process writes its own event file (the directory actor too), so many trainers
logging to one ``log_dir`` never write into the same file.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["Metrics"]


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
