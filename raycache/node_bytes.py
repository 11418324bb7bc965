"""Bytes read per node, and bytes that crossed nodes: counted per chunk, never per item.

A process reads a chunk's bytes out of its node's object store once it has mapped the
chunk (its items are then views of it), so mapping is the one event that moves data:
``ReadCounter`` counts it in the reading process, with the chunk's size, and asks the
chunk's owner beforehand which nodes hold a copy (``get_object_locations``, one call
per chunk mapped): a mapping on a node that held none copied the chunk across the
network. The counts go to the directory actor, not waited for, summed over at most
``REPORT_INTERVAL_S`` (a call per chunk mapped cost more than mapping the chunk: with
1,434 chunks of 1 MiB, a new process's first 6,400 reads spent 1.08 of 2.0 s on those
calls), and at the latest at the client's next heartbeat, ``stats()`` or ``close()``
(``flush``); ``NodeBytes`` adds them up there for ``stats()``.

What the figures mean: ``read_bytes`` per node is the bytes of chunks its processes
mapped (each process counts its own mapping; a second process on the node reads the
copy the first one brought); ``crossed_bytes`` is the part of it that had no copy on
the node when it was mapped, which Ray then copied from another node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import ray

__all__ = ["NODES_CHECK_S", "REPORT_INTERVAL_S", "NodeBytes", "ReadCounter"]

logger = logging.getLogger(__name__)

# How long a client trusts its last count of the cluster's nodes. On one node nothing
# can cross, and the owner is not asked where a chunk is (a call per chunk mapped).
NODES_CHECK_S = 10.0
# The longest a count waits before it is sent with the next chunk mapped.
REPORT_INTERVAL_S = 0.5


class NodeBytes:
    """The directory's totals of chunk bytes read and crossed, per reading node."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[str, int] = defaultdict(int)
        self._crossed: dict[str, int] = defaultdict(int)

    def add(self, node_id: str, read: int, crossed: int) -> None:
        """Count ``read`` bytes mapped on ``node_id``, ``crossed`` of them from elsewhere.

        Parameters
        ----------
        node_id : str
            The reading node.
        read : int
            Bytes of chunks mapped there.
        crossed : int
            The part that had no copy on the node.
        """
        with self._lock:
            self._read[node_id] += int(read)
            self._crossed[node_id] += int(crossed)

    def report(self) -> dict:
        """Return ``node_read_bytes``, ``node_crossed_bytes`` (by node id), ``crossed_bytes``."""
        with self._lock:
            return {
                "node_read_bytes": dict(self._read),
                "node_crossed_bytes": dict(self._crossed),
                "crossed_bytes": sum(self._crossed.values()),
            }


class ReadCounter:
    """A process's counts of chunk bytes it mapped, and their reports to the actor.

    Parameters
    ----------
    link : raycache.client.link.ActorLink
        The line to the directory actor (``note_reads``): a report is sent only while
        it is usable, and a failure to send marks it, as any call to the actor does.
    """

    def __init__(self, link: Any):
        self._link = link
        self._node_id: str | None = None
        self._lock = threading.Lock()  # mapping threads count, the heartbeat reports
        self._pending: list[Any] = []  # reports sent, maybe not counted yet
        self._sent = (0, 0)  # of ``read`` and ``crossed``, what has been reported
        self._reported_at = -REPORT_INTERVAL_S
        self._several_nodes = False
        self._nodes_checked = -NODES_CHECK_S
        self.read = 0
        self.crossed = 0

    @property
    def node_id(self) -> str:
        """Return the id of the node this process runs on (looked up once)."""
        if self._node_id is None:
            self._node_id = ray.get_runtime_context().get_node_id()
        return self._node_id

    def is_local(self, ref: Any) -> bool:
        """Return True if a copy of chunk ``ref`` is in this node's store already.

        Parameters
        ----------
        ref : ray.ObjectRef
            The chunk.

        Returns
        -------
        bool
            True when the owner lists this node among the chunk's locations.
        """
        now = time.monotonic()
        if now - self._nodes_checked >= NODES_CHECK_S:
            self._nodes_checked = now
            self._several_nodes = sum(n["Alive"] for n in ray.nodes()) > 1
        if not self._several_nodes:
            return True
        where = ray.experimental.get_object_locations([ref], timeout_ms=5000).get(ref) or {}
        return self.node_id in (where.get("node_ids") or ())

    def count(self, nbytes: int, local: bool) -> None:
        """Count one mapped chunk of ``nbytes``; report what is unsent if it is time to.

        Parameters
        ----------
        nbytes : int
            The chunk's bytes.
        local : bool
            Whether its node held a copy before the mapping.
        """
        crossed = 0 if local else int(nbytes)
        with self._lock:
            self.read += int(nbytes)
            self.crossed += crossed
            if time.monotonic() - self._reported_at >= REPORT_INTERVAL_S:
                self._report()

    def report_unsent(self) -> None:
        """Send the counts not reported yet, if any (not waited for)."""
        with self._lock:
            self._report()

    def _report(self) -> None:
        """Send the unsent counts in one call (``_lock`` held)."""
        read, crossed = self.read - self._sent[0], self.crossed - self._sent[1]
        if not (read or crossed) or not self._link.usable():
            return
        self._sent = (self.read, self.crossed)
        self._reported_at = time.monotonic()
        try:
            self._pending = [r for r in self._pending if not ray.wait([r], timeout=0)[0]]
        except Exception as exc:  # Ray is going away: the reports on their way go with it
            logger.debug("raycache: reports of mapped bytes dropped: %s", exc)
            self._pending = []
        ref = self._link.submit("note_reads", self.node_id, read, crossed)
        if isinstance(ref, ray.ObjectRef):  # else the link is marked lost (``submit``)
            self._pending.append(ref)

    def flush(self, timeout: float) -> None:
        """Report the unsent counts and wait up to ``timeout`` s for every report.

        Parameters
        ----------
        timeout : float
            Seconds.
        """
        with self._lock:
            self._report()
            pending, self._pending = self._pending, []
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=timeout)
