"""Fork hooks for every live client of this process.

Ray is not fork-safe: a forked child that makes a Ray call can kill the node's raylet
(``docs/design.md``). A DataLoader forks its workers from a process whose clients are
attached, so before each fork every client sends what it buffered, catches up and maps
every chunk (a forked child reads only what was mapped at the fork, and the parent's
references keep those objects alive); after it, the child's clients stop calling Ray
and the parent starts reading what the child sends it (``raycache.relay``).

Guarantees: a failure to prepare one client is logged and never breaks the fork.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from raycache.runtime import in_forked_child

__all__ = ["forget", "register"]

logger = logging.getLogger(__name__)

_live_clients: weakref.WeakSet = weakref.WeakSet()


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
    for client in list(_live_clients):
        if client.pid != os.getpid() or client.closed or client.dead or in_forked_child():
            continue
        try:
            client.prepare_fork()
        except Exception:  # a failed preparation must not break the fork
            logger.exception("raycache: preparing cache %s for fork failed", client.name)


def _after_fork_in_parent() -> None:
    for client in list(_live_clients):
        if client.pid == os.getpid():
            client.after_fork_in_parent()


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client.after_fork_in_child()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
