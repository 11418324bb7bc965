"""The preload's failed reads, logged as a few examples and one summary, not a line each.

A provider that cannot read many of its items (an unsupported value in every item, a
missing directory) would otherwise write a log line per index: 200 lines for 200 items,
a million for a large dataset, and the one line that says what is wrong is lost among
them. ``FailureLog`` keeps every failure for ``stats()["preload_errors"]``, logs the
first ``EXAMPLES`` with their errors, and one summary when the run ends.
"""

from __future__ import annotations

import logging

__all__ = ["EXAMPLES", "FailureLog"]

logger = logging.getLogger(__name__)

EXAMPLES = 3  # failures logged one by one before the rest are only counted


class FailureLog:
    """Records a preload run's failed reads in ``errors`` and logs them sparingly.

    Parameters
    ----------
    errors : list of dict
        Where each failure is appended as ``{"index", "error"}`` (the run's
        ``Progress.errors``, which ``stats()`` reports).
    """

    def __init__(self, errors: list[dict]):
        self.errors = errors
        self.logged = 0

    def failed(self, failures: list[tuple[int | None, str]]) -> None:
        """Record failed reads; log each of the first ``EXAMPLES`` of the run.

        Parameters
        ----------
        failures : list of (int or None, str)
            ``(index, error)`` pairs; index None for a failure of the run itself.
        """
        for idx, detail in failures:
            detail = _without_index_note(detail, idx)
            self.errors.append({"index": idx, "error": detail})
            if self.logged < EXAMPLES:
                self.logged += 1
                last = self.logged == EXAMPLES
                more = " (further failures are counted, not logged)" if last else ""
                logger.error(
                    "raycache preload could not read index %s: %s%s",
                    idx,
                    _first_line(detail),
                    more,
                )

    def summarize(self, length: int, stored: int) -> None:
        """Log one line for the whole run if any read failed.

        Parameters
        ----------
        length : int
            Items of the provider.
        stored : int
            Items the run stored.
        """
        failed = [e for e in self.errors if e["index"] is not None]
        count = len(failed)
        if not count:  # none, or only the run's own failure, which the run logs itself
            return
        first = failed[0]
        logger.error(
            "raycache preload ended: %d of %d items could not be read, %d stored "
            "(first: index %s: %s); stats()['preload_errors'] lists every one",
            count,
            length,
            stored,
            first["index"],
            _first_line(first["error"]),
        )


def _first_line(detail: str) -> str:
    """Return the error's own line (a traceback's notes and context follow it)."""
    lines = detail.strip().splitlines()
    return lines[0] if lines else ""


def _without_index_note(detail: str, idx: int | None) -> str:
    """Drop the note ``read_raw`` adds (``note_provider_index``): the index is its own field."""
    note = f"raised by the provider reading index {idx}"
    return "\n".join(line for line in detail.splitlines() if line.strip() != note)
