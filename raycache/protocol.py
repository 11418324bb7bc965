"""The wire contract between trainers, the directory actor and preload tasks.

Everything here is plain data and arithmetic, with no Ray call, so that the client, the
actor and the preload scheduler agree on one definition and each can be tested alone.
The reply records are ``NamedTuple``s: they pickle as cheaply as tuples (a reply can
carry thousands of events), and are read by field name on both sides.

Locations: a process's map holds, per provider index, ``chunk_id << 32 | row`` as an
int64, or ``MISSING`` (-1). Chunk ids and rows are both below 2**31 (rows are int32 in
the actor's map), so the packed value is never negative for a cached item. The helpers
take scalars or whole arrays: the read path decodes a batch's locations in one numpy
operation, never item by item.

Preload units in flight are published as ``{first index: end}`` (``Inflight``): an index
``i`` is held by the unit ``start`` when ``start <= i < end``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "HELD",
    "INLINE_LIMIT",
    "MISSING",
    "READ_IT",
    "ROW_BITS",
    "ROW_MASK",
    "STORED",
    "AddEvent",
    "Events",
    "Inflight",
    "InsertResult",
    "MapEvent",
    "ReserveResult",
    "RetireEvent",
    "Settings",
    "Snapshot",
    "SyncReply",
    "chunk_ids",
    "held_by_units",
    "pack_locations",
    "rows",
    "unit_holding",
]

# Task returns under 100 KiB are inlined into the owner's heap and copied into every
# reader; chunks smaller than this are put into the shared store again by the actor.
INLINE_LIMIT = 100 * 1024

# What the actor says of each index a trainer asks to reserve while a preload runs:
# the trainer reads it itself, a preload unit holds it (wait for it), or it is cached.
READ_IT, HELD, STORED = 0, 1, 2

MISSING = -1
ROW_BITS = 32
ROW_MASK = 0xFFFFFFFF

# First index of each preload unit being read -> the index after its last.
Inflight = dict[int, int]


class Settings(NamedTuple):
    """The cache's settings, as the actor returns them to an attaching client.

    Every client follows these, not its own config: the first client's config made
    the cache.
    """

    length: int
    chunk_size: int | None
    chunk_bytes: int
    max_bytes: int
    detached: bool


class AddEvent(NamedTuple):
    """Indices ``indices`` are now at rows ``rows`` of chunk ``cid``."""

    cid: int
    indices: np.ndarray
    rows: np.ndarray


class RetireEvent(NamedTuple):
    """Chunks ``cids`` are freed; any index they held has been moved already."""

    cids: list[int]


MapEvent = AddEvent | RetireEvent


class Events(NamedTuple):
    """A sync reply: the map's events since the client's version.

    ``refs`` holds the ObjectRef of each chunk added by ``events``; ``inflight`` the
    preload units being read, None when no preload runs.
    """

    version: int
    events: list[MapEvent]
    refs: dict[int, Any]
    inflight: Inflight | None


class Snapshot(NamedTuple):
    """A sync reply for a new or far-behind client: the whole map.

    ``chunk_of``/``row_of`` per index (chunk -1 where missing), ``refs`` every live
    chunk's ObjectRef, ``inflight`` as in ``Events``.
    """

    version: int
    chunk_of: np.ndarray
    row_of: np.ndarray
    refs: dict[int, Any]
    inflight: Inflight | None


SyncReply = Events | Snapshot


class InsertResult(NamedTuple):
    """What an insert did: items ``added`` and ``rejected`` (over ``max_bytes``).

    ``sync`` is what a sync from the client's version returns after the insert (None
    when the caller gave no client id), and ``own_events`` how many of its events this
    insert made: more events than that mean the map changed elsewhere too.
    """

    added: int
    rejected: int
    sync: SyncReply | None = None
    own_events: int = 0

    def news_from_elsewhere(self) -> bool:
        """Return True if ``sync`` holds changes this insert did not make.

        A snapshot may hold anything, so it always counts as news.
        """
        return not isinstance(self.sync, Events) or len(self.sync.events) > self.own_events


class ReserveResult(NamedTuple):
    """The actor's answer to a reservation: ``state`` per index, spares, and the units.

    ``state`` is ``READ_IT``, ``HELD`` or ``STORED`` per index asked; ``spares`` the
    extra indices reserved for the caller; ``inflight`` as in ``Events`` (None: no
    preload runs, and nothing was reserved).
    """

    state: np.ndarray
    spares: np.ndarray
    inflight: Inflight | None


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
    return (np.asarray(chunk_id, dtype=np.int64) << ROW_BITS) | np.asarray(row, dtype=np.int64)


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
    return loc >> ROW_BITS


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


def unit_holding(inflight: Inflight, idx: int) -> int | None:
    """Return the first index of the unit in ``inflight`` that holds ``idx``, or None.

    Parameters
    ----------
    inflight : dict[int, int]
        Units being read: first index -> end.
    idx : int
        The index.

    Returns
    -------
    int or None
        The unit's first index.
    """
    # list(): the actor's scheduler replaces entries from other threads meanwhile.
    return next((a for a, b in list(inflight.items()) if a <= idx < b), None)


def held_by_units(inflight: Inflight, indices: np.ndarray, skip: Iterable[int] = ()) -> np.ndarray:
    """Return, per index, whether a unit of ``inflight`` (other than ``skip``) holds it.

    Parameters
    ----------
    inflight : dict[int, int]
        Units being read: first index -> end.
    indices : numpy.ndarray
        Indices.
    skip : iterable of int
        First indices of units to leave out.

    Returns
    -------
    numpy.ndarray
        A bool per index.
    """
    skip = set(skip)
    held = np.zeros(len(indices), dtype=bool)
    for start, stop in list(inflight.items()):
        if start not in skip:
            held |= (indices >= start) & (indices < stop)
    return held
