"""Mapping one chunk into a process: fetched once, counted, and a lost chunk told apart.

``fetch_chunk`` is the only place a client ``ray.get``s a chunk. It tells three
outcomes apart: the chunk (counted in ``ReadCounter``: its bytes, and whether they
crossed nodes), the chunk alone is lost (its node died: ``raycache.chunk_loss``; the
caller drops it and the cache goes on), or the cache is lost (any other failure, such
as the owner's death or a timeout: the link marks it, once, and the process reads its
provider from then on).
"""

from __future__ import annotations

from typing import Any

import ray

from raycache.chunk import Chunk
from raycache.chunk_loss import is_chunk_loss
from raycache.client.link import ActorLink
from raycache.node_bytes import ReadCounter

__all__ = ["fetch_chunk"]


def fetch_chunk(link: ActorLink, ref: Any, counter: ReadCounter) -> tuple[Chunk | None, bool]:
    """Fetch chunk ``ref``; return ``(chunk, False)``, ``(None, True)`` if it alone is lost.

    Parameters
    ----------
    link : ActorLink
        The client's link, which is marked lost on a failure that is not the chunk's.
    ref : ray.ObjectRef
        The chunk.
    counter : ReadCounter
        Counts the chunk's bytes and whether they crossed nodes.

    Returns
    -------
    tuple
        The mapped chunk or None, and whether the chunk (only) was lost.
    """
    try:
        local = counter.is_local(ref)
        chunk = ray.get(ref, timeout=link.timeout)
    except Exception as exc:
        if is_chunk_loss(exc):
            return None, True
        link.lost(exc)
        return None, False
    counter.count(chunk.nbytes, local)
    return chunk, False
