"""Fork hooks for every live client of this process.

Ray is not fork-safe: a forked child that makes a Ray call can kill the node's raylet
(``docs/design.md``). A DataLoader forks its workers from a process whose clients are
attached, so before each fork every client sends what it buffered, catches up and maps
every chunk (a forked child reads only what was mapped at the fork, and the parent's
references keep those objects alive); after it, the child's clients stop calling Ray
and the parent starts reading what the child sends it (``raycache.relay``).

A forked child's misses are asked of the parent (``raycache.client.fork_reads``, over
``raycache.fork_requests``): items stored since the fork, and preload units to wait for.
A forked child counts its hits and misses like any client, and sends each count to the
parent over the same pipe (a message with index ``COUNTS``), so that the parent's
``stats()`` includes the reads of its DataLoader workers.

Python's cycle collector writes to the header of every object it scans, so a collection
in a forked child copies, page by page, the parent's heap it inherited (one measured
DataLoader worker copied ~110 MiB so, in about half the runs). Before a fork in a process
with a live client, the objects that exist are therefore frozen (``gc.freeze``): the child
never scans them, and the parent unfreezes them right after the fork. A process that froze
objects itself is left as it is.

Guarantees: a failure to prepare one client is logged and never breaks the fork.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from raycache.fork_pins import ChildPins
from raycache.relay import InsertRelay
from raycache.runtime import in_forked_child
from raycache.values import check_item

__all__ = ["COUNTS", "ForkSide", "forget", "register"]

logger = logging.getLogger(__name__)

_live_clients: weakref.WeakSet = weakref.WeakSet()
_froze_at_fork = False  # this process froze the gc's objects for the fork under way

# The index of a relay message that carries a child's (hits, misses), not an item.
COUNTS = -1


class ForkSide:
    """One client's part in forks: the children's inserts and the chunks kept for them.

    Parameters
    ----------
    name : str
        The cache name, for messages.
    deliver : Callable[[int, Any], None]
        Buffers an item a child sent (in the parent, from the relay's thread).
    count : Callable[[int, int], None], optional
        Adds a child's hits and misses to the parent's (from the relay's thread).
    """

    def __init__(
        self,
        name: str,
        deliver: Callable[[int, Any], None],
        count: Callable[[int, int], None] | None = None,
    ):
        self.name = name
        self.pins = ChildPins()  # retired chunks that forked children may still read
        self._deliver = deliver
        self._count = count
        self._relay: InsertRelay | None = None  # made at the first fork
        self._warned = False

    def before_fork(self, views: dict) -> None:
        """Keep ``views`` (what the child can read) and open the child's pipe."""
        self.pins.preparing(views)
        # The child cannot call Ray: it sends what it reads to this process instead.
        if self._relay is None:
            self._relay = InsertRelay(self._receive, self.name, on_exit=self.pins.exited)
        self._relay.before_fork()

    def after_fork_in_parent(self) -> None:
        """Start reading the inserts of the child just forked; keep what it can read."""
        child = self._relay.after_fork_in_parent() if self._relay is not None else None
        self.pins.forked(child)

    def after_fork_in_child(self) -> None:
        """Keep only this child's end of its pipe."""
        if self._relay is not None:
            self._relay.after_fork_in_child()

    def send_from_child(self, idx: int, item: Any) -> None:
        """Send an item read in a forked child to the parent, which inserts it.

        Parameters
        ----------
        idx : int
            The index.
        item : Any
            The item; a bad item raises here, as it would in the parent.
        """
        check_item(item)  # pickling copies it
        if self._relay is not None and self._relay.send(idx, item):
            return
        if not self._warned:
            self._warned = True
            logger.warning(
                "raycache %s: this forked process cannot insert into the cache (Ray is not "
                "fork-safe) and has no pipe to its parent; misses here are read from the "
                "provider and not cached. Preload the cache, or use "
                "multiprocessing_context='spawn'.",
                self.name,
            )

    def counted(self, hits: int, misses: int) -> None:
        """Send a forked child's hits and misses to the parent (child side).

        Parameters
        ----------
        hits : int
            Reads answered from the cache.
        misses : int
            Reads that were not.
        """
        if self._relay is not None and (hits or misses):
            self._relay.send(COUNTS, (int(hits), int(misses)))

    def _receive(self, idx: int, item: Any) -> None:
        """Take one message from a child (parent side): counts, or an item to insert."""
        if idx == COUNTS:
            if self._count is not None:
                self._count(*item)
            return
        self._deliver(idx, item)

    def drain(self) -> None:
        """Deliver what forked children have sent so far (parent side)."""
        if self._relay is not None:
            self._relay.drain()

    def close(self) -> None:
        """Stop reading children's pipes."""
        if self._relay is not None:
            self._relay.close()


def register(client: Any) -> None:
    """Run ``client``'s fork hooks at every fork of this process while it lives.

    Parameters
    ----------
    client : CacheClient
        The client (``prepare_fork``, ``after_fork_in_parent``, ``after_fork_in_child``).
    """
    _live_clients.add(client)


def forget(client: Any) -> None:
    """Stop running ``client``'s fork hooks (it has closed).

    Parameters
    ----------
    client : CacheClient
        The client.
    """
    _live_clients.discard(client)


def _before_fork() -> None:
    global _froze_at_fork
    prepared = False
    for client in list(_live_clients):
        if client.pid != os.getpid() or client.closed or client.dead or in_forked_child():
            continue
        prepared = True
        try:
            client.prepare_fork()
        except Exception:  # a failed preparation must not break the fork
            logger.exception("raycache: preparing cache %s for fork failed", client.name)
    if prepared and gc.get_freeze_count() == 0:
        gc.freeze()  # the child's collector leaves the inherited heap's pages shared
        _froze_at_fork = True


def _after_fork_in_parent() -> None:
    global _froze_at_fork
    if _froze_at_fork:
        _froze_at_fork = False
        gc.unfreeze()
    for client in list(_live_clients):
        if client.pid == os.getpid():
            client.after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _froze_at_fork
    _froze_at_fork = False  # the inherited objects stay frozen in the child
    for client in list(_live_clients):
        client.after_fork_in_child()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
