"""Which node's trainers read each index: the plan a locality preload follows.

On a cluster, a chunk lives in the object store of the node that built it, and a
trainer on another node copies the whole chunk over the network on its first read.
When the trainers of each node read a fixed share of the indices every epoch (shuffled
within the node, never across nodes), the preload can build each chunk on the node
that will read it, and a warm epoch then crosses no network. ``LocalityPlan`` is that
share, one node per index; the cache's preload follows it when the cache was created
with ``raycache.locality = "nodes"`` (a plan of equal blocks over the cluster's nodes)
or when ``preload_on_nodes`` is given one.

Guarantees: a plan names one live-at-creation node for every index (checked, with the
offending index or node named); ``node_indices`` of every node together are every
index once, so trainers that each read their node's share read the whole dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray

__all__ = ["LocalityPlan", "chunk_nodes", "cluster_nodes", "node_indices", "preload_on_nodes"]


class LocalityPlan:
    """One node id per index: the node whose trainers read it.

    Parameters
    ----------
    node_ids : Sequence[str]
        The nodes, as Ray's hex node ids.
    node_of : numpy.ndarray
        Per index, the position in ``node_ids`` of its node.

    Raises
    ------
    ValueError
        If ``node_ids`` is empty or repeats a node, or an entry of ``node_of`` names
        no node.
    """

    def __init__(self, node_ids: Sequence[str], node_of: np.ndarray):
        self.node_ids = [str(n) for n in node_ids]
        if not self.node_ids or len(set(self.node_ids)) != len(self.node_ids):
            raise ValueError(f"a locality plan needs distinct node ids, got {self.node_ids!r}")
        self.node_of = np.asarray(node_of, dtype=np.int32)
        bad = np.flatnonzero((self.node_of < 0) | (self.node_of >= len(self.node_ids)))
        if len(bad):
            raise ValueError(
                f"locality plan: index {int(bad[0])} names node position "
                f"{int(self.node_of[bad[0]])}, but there are {len(self.node_ids)} nodes"
            )

    def __len__(self) -> int:
        return len(self.node_of)

    @classmethod
    def blocks(cls, length: int, node_ids: Sequence[str]) -> LocalityPlan:
        """Return a plan of equal contiguous blocks, one per node, in the given order.

        Parameters
        ----------
        length : int
            Number of indices.
        node_ids : Sequence[str]
            The nodes.

        Returns
        -------
        LocalityPlan
            Node ``k`` reads ``[k * length // n, (k + 1) * length // n)``.
        """
        n = len(node_ids)
        node_of = (np.arange(length, dtype=np.int64) * n // max(1, length)).astype(np.int32)
        return cls(node_ids, node_of)

    @classmethod
    def from_ranks(cls, length: int, node_of_rank: Sequence[str]) -> LocalityPlan:
        """Return the plan of ``DistributedSampler(shuffle=False)`` over these ranks.

        Rank ``r`` of ``W`` reads indices ``r, r + W, r + 2W, ...`` (the padding that
        evens out the ranks repeats indices already planned); its node reads them.

        Parameters
        ----------
        length : int
            Number of indices.
        node_of_rank : Sequence[str]
            The node id of each rank, in rank order.

        Returns
        -------
        LocalityPlan
            Index ``i`` on the node of rank ``i % W``.
        """
        nodes = list(dict.fromkeys(node_of_rank))
        position = np.array([nodes.index(n) for n in node_of_rank], dtype=np.int32)
        return cls(nodes, position[np.arange(length) % len(position)])

    @classmethod
    def from_mapping(cls, length: int, mapping: Mapping[str, Any]) -> LocalityPlan:
        """Return the plan of a user-given mapping: node id -> the indices it reads.

        Parameters
        ----------
        length : int
            Number of indices.
        mapping : Mapping[str, Any]
            Node id -> its indices (any integer sequence).

        Returns
        -------
        LocalityPlan
            The plan.

        Raises
        ------
        ValueError
            If an index is out of range, given twice, or given to no node.
        """
        node_of = np.full(length, -1, dtype=np.int32)
        for position, (node, indices) in enumerate(mapping.items()):
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            out = idx[(idx < 0) | (idx >= length)]
            if len(out):
                raise ValueError(
                    f"locality plan: node {node}: index {int(out[0])} is not in [0, {length})"
                )
            values, counts = np.unique(idx, return_counts=True)
            twice = np.concatenate([idx[node_of[idx] >= 0], values[counts > 1]])
            if len(twice):
                raise ValueError(f"locality plan: index {int(twice[0])} is given more than once")
            node_of[idx] = position
        unplanned = np.flatnonzero(node_of < 0)
        if len(unplanned):
            raise ValueError(
                f"locality plan: index {int(unplanned[0])} (and {len(unplanned) - 1} more) "
                "is given to no node; every index needs one"
            )
        return cls(list(mapping), node_of)

    def indices_on(self, node_id: str) -> np.ndarray:
        """Return the indices node ``node_id`` reads (empty for a node not in the plan).

        Parameters
        ----------
        node_id : str
            A node id.

        Returns
        -------
        numpy.ndarray
            Sorted int64 indices.
        """
        if node_id not in self.node_ids:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.node_of == self.node_ids.index(node_id)).astype(np.int64)


def cluster_nodes() -> list[str]:
    """Return the ids of the cluster's live nodes that have CPUs, sorted.

    Returns
    -------
    list of str
        Ray's hex node ids; the order every process computes alike.
    """
    nodes = ray.nodes()
    return sorted(n["NodeID"] for n in nodes if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def node_indices(cache: Any, node_id: str | None = None) -> np.ndarray:
    """Return the indices of ``cache``'s locality plan that a node's trainers read.

    Parameters
    ----------
    cache : raycache.DataCache
        An attached cache (``CachedDataset.cache``).
    node_id : str, optional
        The node; None: the node this process runs on.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices; every index when the cache has no plan.

    Raises
    ------
    RuntimeError
        If the cache is not usable in this process.
    """
    client = cache.attach()
    if client is None:
        raise RuntimeError(f"cache {cache.name!r} is not usable in this process")
    plan = ray.get(client.actor.locality_plan.remote(), timeout=client.timeout)
    if plan is None:
        return np.arange(client.length, dtype=np.int64)
    return plan.indices_on(node_id or ray.get_runtime_context().get_node_id())


def preload_on_nodes(cache: Any, provider: Any, plan: LocalityPlan) -> dict:
    """Start ``cache``'s preload following ``plan``: each chunk built on its node.

    Parameters
    ----------
    cache : raycache.DataCache
        An attached cache whose preload has not started (create it with
        ``data_set.preload_cache = false``, or the standard preload starts first).
    provider : Any
        The cache's provider, which the preload tasks read.
    plan : LocalityPlan
        One node per index; ``len(plan)`` must be the cache's length.

    Returns
    -------
    dict
        The preload's status (a preload that had started already goes on as it was).

    Raises
    ------
    ValueError
        If the plan's length is not the cache's.
    RuntimeError
        If the cache is not usable in this process.
    """
    from raycache.provider import pickle_provider

    client = cache.attach()
    if client is None:
        raise RuntimeError(f"cache {cache.name!r} is not usable in this process")
    if len(plan) != client.length:
        raise ValueError(
            f"locality plan holds {len(plan)} indices; cache {cache.name!r} holds {client.length}"
        )
    blob = pickle_provider(provider)
    config = cache.config
    ref = client.actor.start_preload.remote(
        blob, config.preload_threads, config.preload_cpus, plan=plan
    )
    status = ray.get(ref, timeout=client.timeout)
    client.sync(force=True)
    return status


def chunk_nodes(cache: Any) -> dict[int, set[str]]:
    """Return the nodes that hold a copy of each live chunk of ``cache``, asked of Ray.

    For checking where a preload put the chunks, or what a warm epoch copied where;
    it asks the directory for the whole map and Ray for every chunk's locations.

    Parameters
    ----------
    cache : raycache.DataCache
        An attached cache.

    Returns
    -------
    dict
        Chunk id -> the set of node ids holding a copy.

    Raises
    ------
    RuntimeError
        If the cache is not usable in this process.
    """
    client = cache.attach()
    if client is None:
        raise RuntimeError(f"cache {cache.name!r} is not usable in this process")
    # A reply to a map at version 0 holds every live chunk's ref.
    snapshot = ray.get(client.actor.sync.remote(client.client_id, 0), timeout=client.timeout)
    refs = dict(getattr(snapshot, "refs", {}))
    where = ray.experimental.get_object_locations(list(refs.values())) if refs else {}
    return {cid: set(where[ref]["node_ids"]) for cid, ref in refs.items()}
