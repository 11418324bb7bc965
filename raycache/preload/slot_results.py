"""What a preload slot's generator task yielded: a unit's chunk and summary, or its error.

A preload task (``raycache.preload.task``) yields, per unit, the chunk and then the
unit's summary. A task that raises yields one value instead, its error, and ends; taken
for a chunk, that value would look like a task that ended without a summary. The
functions here tell the two apart, so that the run records the task's own error (a
provider that does not unpickle in Ray's workers, a read that crashed the process), not
the generator's ``StopIteration``.
"""

from __future__ import annotations

import time
from typing import Any

import ray

__all__ = ["next_unit", "task_error"]

ERROR_TIMEOUT_S = 60.0  # a failed task's error is already stored: reading it is quick


def next_unit(slot: Any) -> tuple[Any, dict, float] | None:
    """Return a slot's next unit, or None once the slot has ended.

    Parameters
    ----------
    slot : ray.ObjectRefGenerator
        A preload task's generator.

    Returns
    -------
    tuple or None
        ``(chunk ref, summary, time.monotonic() when the chunk's ref came)``.

    Raises
    ------
    Exception
        The error the task raised (a ``ray.exceptions.RayTaskError``), or the error of
        its process's death; a ``RuntimeError`` if it ended between a chunk and its
        summary without one.
    """
    try:
        chunk_ref = next(slot)
    except StopIteration:
        return None
    came = time.monotonic()
    summary_ref = next(slot, None)
    if summary_ref is None:  # the one value was the task's error: this raises it
        ray.get(chunk_ref, timeout=ERROR_TIMEOUT_S)
        raise RuntimeError("the preload task ended without its unit's summary")
    return chunk_ref, ray.get(summary_ref), came


def task_error(exc: BaseException) -> str:
    """Return one line saying why a preload task failed: its own error, not Ray's wrapper.

    Parameters
    ----------
    exc : BaseException
        What reading the task's values raised.

    Returns
    -------
    str
        ``"Type: first line of the message"`` of the error the task raised (a Ray
        task error's ``cause``), else of ``exc``.
    """
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0] if lines else ''}"
