"""The directory actor's cluster side: lost chunks, bytes per node, and the locality plan.

``ClusterSide`` is a base of ``raycache.directory.CacheDirectory``; these are actor
methods of every cache. They hold what only matters once a cache spans several nodes:

- ``chunk_lost``: a client found every copy of a chunk gone (its node died). The map
  forgets the chunk's indices (``raycache.chunk_loss``), so the next read of each is a
  miss that the reader fills from the provider, in every process; the cache lives on.
- ``note_reads``: clients report the chunk bytes they mapped, and how many crossed
  nodes (``raycache.node_bytes``); ``cluster_stats`` adds them to ``stats()``.
- ``locality_plan`` and ``preload_run``: the plan a preload follows (from the cache's
  ``locality`` setting, fixed when the cache is created, or given to the preload), and
  the run that follows it (``raycache.locality_preload``) or the standard one.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from raycache.chunk_loss import forget_chunk
from raycache.locality import LocalityPlan, cluster_nodes
from raycache.locality_preload import LocalityRun
from raycache.node_bytes import NodeBytes
from raycache.preload import PreloadRun

__all__ = ["ClusterSide", "default_plan"]

logger = logging.getLogger(__name__)


def default_plan(spec: dict) -> LocalityPlan | None:
    """Return the plan a cache's ``locality`` setting asks for (None: no plan).

    Parameters
    ----------
    spec : dict
        The cache's creation arguments (``length``, ``locality``).

    Returns
    -------
    LocalityPlan or None
        With ``locality = "nodes"``, equal blocks over the cluster's nodes with CPUs.
    """
    if spec.get("locality", "off") != "nodes":
        return None
    return LocalityPlan.blocks(int(spec["length"]), cluster_nodes())


class ClusterSide:
    """Actor methods for a cache spread over nodes (a base of ``CacheDirectory``).

    Parameters
    ----------
    chunk_map : raycache.directory_map.ChunkMap
        The cache's map.
    lock : threading.RLock
        The lock that guards it.
    spec : dict
        The cache's creation arguments.
    """

    def __init__(self, chunk_map: Any, lock: threading.RLock, spec: dict):
        self._cluster_map = chunk_map
        self._cluster_lock = lock
        self._plan = default_plan(spec)
        self.node_bytes = NodeBytes()
        self.lost_chunks = 0

    def chunk_lost(self, cid: int, client_id: str, since: int) -> Any:
        """Forget chunk ``cid``, whose every copy is gone; return the client's news.

        Parameters
        ----------
        cid : int
            The chunk.
        client_id : str
            The client that found it lost.
        since : int
            The version of that client's map.

        Returns
        -------
        Events or Snapshot
            What ``sync(client_id, since)`` returns, the loss included.
        """
        with self._cluster_lock:
            event = forget_chunk(self._cluster_map, int(cid))
            if event is not None:
                self.lost_chunks += 1
                logger.warning(
                    "raycache: chunk %d was lost with its node; its %d items are read again "
                    "from the provider on their next read",
                    cid,
                    len(event.indices),
                )
        return self.sync(client_id, since)

    def note_reads(self, node_id: str, read: int, crossed: int) -> None:
        """Count chunk bytes a client on ``node_id`` mapped (see ``NodeBytes.add``)."""
        self.node_bytes.add(node_id, read, crossed)

    def locality_plan(self) -> LocalityPlan | None:
        """Return the plan the preload follows (or will), None without one."""
        return self._plan

    def cluster_stats(self) -> dict:
        """Return the bytes per node (``NodeBytes.report``) and ``lost_chunks``."""
        return {**self.node_bytes.report(), "lost_chunks": self.lost_chunks}

    def preload_run(self, plan: LocalityPlan | None, **run: Any) -> Any:
        """Return the preload for ``run``'s arguments: by ``plan`` (or the cache's), else standard.

        Parameters
        ----------
        plan : LocalityPlan or None
            A plan given to this preload; None: the cache's own, if any.
        **run : Any
            ``PreloadRun``'s keyword arguments.

        Returns
        -------
        PreloadRun or LocalityRun
            The run, started.
        """
        if plan is not None:
            self._plan = plan
        make = PreloadRun if self._plan is None else functools.partial(LocalityRun, self._plan)
        return make(**run)

    def sync(self, client_id: str, since: int, hits: int = 0, misses: int = 0) -> Any:
        """Return what changed in the map (implemented by ``CacheDirectory``)."""
        raise NotImplementedError
