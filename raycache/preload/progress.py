"""A preload run's progress: what it stored, how fast, what failed, and when it may end.

Counters are written by the run's driving thread only and read by any thread without a
lock (each is one attribute, replaced whole), so ``DataCache.stats()`` can report them
while the run goes on and without waiting for the scheduler. The figures are per unit,
never per item: keeping them costs the read path nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Progress"]


class Progress:
    """The counters of one preload run, and the status built from them.

    Parameters
    ----------
    clock : Callable[[], float]
        Wall-clock seconds (``time.time``; a test passes its own).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.state = "running"  # then "done", "done_with_errors" or "failed"
        self.errors: list[dict] = []  # {"index": int or None, "error": str}, in order
        self.items = 0  # items in the chunks the run handed to the cache
        self.bytes = 0
        self.started = clock()
        self.finished: float | None = None

    def stored(self, items: int, nbytes: int) -> None:
        """Count one unit's chunk handed to the cache.

        Parameters
        ----------
        items : int
            Items in the chunk.
        nbytes : int
            Its bytes.
        """
        self.items += items
        self.bytes += nbytes

    def end(self) -> None:
        """Mark the run ended now (its state is set by the caller)."""
        self.finished = self._clock()

    def status(self, items_left: int) -> dict:
        """Return the progress figures.

        Parameters
        ----------
        items_left : int
            About how many items the run still has to read (an overestimate when
            trainers store some of them); ignored once the run has ended.

        Returns
        -------
        dict
            ``state``; ``items`` and ``bytes`` handed to the cache (``loaded``: the same
            as ``items``); ``items_per_s`` since the start; ``eta_s``, the seconds to the
            end at that pace (0.0 once ended, None while no item is stored yet);
            ``errors`` (a list of ``{"index", "error"}``) and ``error_count``;
            ``seconds`` since the start.
        """
        end = self.finished if self.finished is not None else self._clock()
        seconds = max(end - self.started, 0.0)
        rate = self.items / seconds if seconds > 0 and self.items else 0.0
        if self.finished is not None:
            eta = 0.0
        elif rate:
            eta = items_left / rate
        else:
            eta = None  # nothing stored yet: no pace to go by
        errors = list(self.errors)
        return {
            "state": self.state,
            "items": self.items,
            "loaded": self.items,
            "bytes": self.bytes,
            "items_per_s": rate,
            "eta_s": eta,
            "errors": errors,
            "error_count": len(errors),
            "seconds": seconds,
        }
