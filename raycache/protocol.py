"""The wire contract between trainers, the directory actor and preload tasks.

Everything here is plain data and arithmetic, with no Ray call, so that the client, the
actor and the preload scheduler agree on one definition and each can be tested alone.

Locations: a process's map holds, per provider index, ``chunk_id << 32 | row`` as an
int64, or ``MISSING`` (-1). Chunk ids and rows are both below 2**31 (rows are int32 in
the actor's map), so the packed value is never negative for a cached item.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "HELD",
    "INLINE_LIMIT",
    "MISSING",
    "READ_IT",
    "ROW_MASK",
    "STORED",
    "chunk_ids",
    "pack_locations",
    "rows",
]

# Task returns under 100 KiB are inlined into the owner's heap and copied into every
# reader; chunks smaller than this are put into the shared store again by the actor.
INLINE_LIMIT = 100 * 1024

# What the actor says of each index a trainer asks to reserve while a preload runs:
# the trainer reads it itself, a preload unit holds it (wait for it), or it is cached.
READ_IT, HELD, STORED = 0, 1, 2

MISSING = -1
ROW_MASK = np.int64(0xFFFFFFFF)


def pack_locations(chunk_id: Any, row: Any) -> Any:
    """Return ``chunk_id << 32 | row`` (scalars or int arrays, broadcast).

    Parameters
    ----------
    chunk_id : int or numpy.ndarray
        Chunk ids.
    row : int or numpy.ndarray
        Rows inside those chunks.

    Returns
    -------
    numpy.int64 or numpy.ndarray
        The packed locations.
    """
    return (np.asarray(chunk_id, dtype=np.int64) << 32) | np.asarray(row, dtype=np.int64)


def chunk_ids(loc: Any) -> Any:
    """Return the chunk id of each packed location (scalar or array).

    Parameters
    ----------
    loc : int or numpy.ndarray
        Packed locations, none of them ``MISSING``.

    Returns
    -------
    int or numpy.ndarray
        The chunk ids.
    """
    return loc >> 32


def rows(loc: Any) -> Any:
    """Return the row of each packed location (scalar or array).

    Parameters
    ----------
    loc : int or numpy.ndarray
        Packed locations, none of them ``MISSING``.

    Returns
    -------
    int or numpy.ndarray
        The rows.
    """
    return loc & ROW_MASK
