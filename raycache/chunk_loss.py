"""A chunk whose every copy is gone: how a reader tells, and how the map forgets it.

A chunk lives in the object store of one node or a few. When those nodes die, Ray
raises a subclass of ``ObjectLostError`` for it (``ObjectReconstructionFailedError``,
``ObjectFetchTimedOutError``, ...) while the directory actor and every other chunk are
fine. Such an error is about that chunk alone: the reader drops it, the directory
forgets the indices it held (``forget_chunk``), and the next read of each of them is a
miss that reads the provider and stores the item again. Only the directory actor's own
loss (its calls fail, or ``OwnerDiedError``: the chunks' owner is gone) loses the cache.

Guarantees: ``forget_chunk`` unmaps exactly the indices that still point at the lost
chunk, once (a second report of the same chunk changes nothing), and logs a
``LostEvent`` so that every client unmaps them too, without a scan of its own map.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
from ray.exceptions import ObjectLostError, OwnerDiedError

from raycache.protocol import MISSING, ROW_BITS

__all__ = ["LostEvent", "forget_chunk", "is_chunk_loss", "unmap_lost"]

logger = logging.getLogger(__name__)


class LostEvent(NamedTuple):
    """Chunk ``cid`` was lost; ``indices`` (which it held) are not cached any more."""

    cid: int
    indices: np.ndarray


def is_chunk_loss(exc: BaseException) -> bool:
    """Return True if ``exc``, raised fetching a chunk, means only that chunk is gone.

    Parameters
    ----------
    exc : BaseException
        What ``ray.get`` of the chunk raised.

    Returns
    -------
    bool
        True for Ray's lost-object errors, except ``OwnerDiedError``: the owner of
        every chunk is the directory actor, so that one means the whole cache is gone.
    """
    return isinstance(exc, ObjectLostError) and not isinstance(exc, OwnerDiedError)


def forget_chunk(chunk_map: Any, cid: int) -> LostEvent | None:
    """Unmap lost chunk ``cid`` from the directory's map and log the change.

    Parameters
    ----------
    chunk_map : raycache.directory_map.ChunkMap
        The map (the caller holds the directory's lock).
    cid : int
        The chunk reported lost.

    Returns
    -------
    LostEvent or None
        The event appended to the map's log; None if the chunk was not live (retired
        or reported already).
    """
    if cid not in chunk_map.refs:
        return None
    # One scan of the map per lost chunk: losses are rare, the map is 4 bytes an index.
    indices = np.flatnonzero(chunk_map.chunk_of == cid).astype(np.int64)
    chunk_map.chunk_of[indices] = -1
    chunk_map.items -= len(indices)
    chunk_map.refs.pop(cid)
    chunk_map.nbytes -= chunk_map.sizes.pop(cid, (0, 0))[1]
    event = LostEvent(int(cid), indices)
    chunk_map.events.append(event)
    return event


def unmap_lost(loc: np.ndarray, event: LostEvent) -> None:
    """Mark the indices of ``event`` missing in a client's map where they point at its chunk.

    Parameters
    ----------
    loc : numpy.ndarray
        The client's map (``raycache.protocol`` locations), changed in place.
    event : LostEvent
        The loss.
    """
    idx = event.indices
    if len(idx):
        held = loc[idx]
        idx = idx[(held >= 0) & ((held >> ROW_BITS) == event.cid)]
        loc[idx] = MISSING
