"""Mapping chunks into a process: fetched once, counted, and a lost chunk told apart.

``fetch_chunk`` and ``fetch_chunks`` are the only places a client ``ray.get``s a chunk.
``fetch_chunk`` tells three outcomes apart: the chunk (counted in ``ReadCounter``: its
bytes, and whether they crossed nodes), the chunk alone is lost (its node died:
``raycache.chunk_loss``; the caller drops it and the cache goes on), or the cache is
lost (any other failure, such as the owner's death or a timeout: the link marks it,
once, and the process reads its provider from then on).

``fetch_chunks`` gets several chunks in one ``ray.get``: 0.07 ms a chunk against
0.15-0.34 ms one by one (1 MiB chunks, one node), which a process reading a cache of
thousands of chunks pays for each of them once. Where one of them is lost it returns
nothing and the caller fetches them one by one, so that each outcome is told apart as
above; any other failure marks the link, as there.
"""

from __future__ import annotations

from typing import Any

import ray

from raycache.chunk import Chunk
from raycache.chunk_loss import is_chunk_loss
from raycache.client.link import ActorLink
from raycache.node_bytes import ReadCounter

__all__ = ["fetch_chunk", "fetch_chunks"]


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
    chunks, lost = _fetch(link, [ref], counter)
    return (None if chunks is None else chunks[0]), lost


def fetch_chunks(link: ActorLink, refs: list, counter: ReadCounter) -> list[Chunk] | None:
    """Fetch chunks ``refs`` in one call; None if one is lost or the cache is.

    Parameters
    ----------
    link : ActorLink
        The client's link, which is marked lost on a failure that is not a chunk's.
    refs : list of ray.ObjectRef
        The chunks.
    counter : ReadCounter
        Counts each chunk's bytes and whether they crossed nodes.

    Returns
    -------
    list of Chunk or None
        The mapped chunks, in order; None where they are to be fetched one by one
        (``fetch_chunk``) to find the lost one, or where the link is marked lost.
    """
    return _fetch(link, refs, counter)[0]


def _fetch(link: ActorLink, refs: list, counter: ReadCounter) -> tuple[list | None, bool]:
    """Get ``refs`` in one call and count them; ``(chunks, False)``, else ``(None, lost)``.

    ``lost``: a chunk alone is lost; any other failure marks the link.
    """
    try:
        local = [counter.is_local(ref) for ref in refs]
        chunks = ray.get(refs, timeout=link.timeout)
    except Exception as exc:
        if is_chunk_loss(exc):
            return None, True
        link.lost(exc)
        return None, False
    for chunk, here in zip(chunks, local):
        counter.count(chunk.nbytes, here)
    return chunks, False
