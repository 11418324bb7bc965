"""Keep retired chunks alive while forked DataLoader workers may still read them.

A forked child reads from the chunks its parent had mapped when it was forked, through
the memory it inherited, and makes no Ray call (``raycache.relay``). The parent, though,
goes on applying the map's changes: when the actor compacts segments into one chunk and
retires them, the parent drops its references, the object store frees the segments and
reuses their memory for the next objects. A child still reading them would serve other
objects' bytes as items (``tests/test_multitrainer.py`` puts arrays after a compaction
and checks that a forked worker still returns the retired segment's items).

So the parent holds on to a retired chunk (its reference and its mapped view, which
keeps the store from reusing the memory) for as long as a child forked while it was
mapped is alive: until that child's relay pipe reports it has exited.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["ChildPins"]


class ChildPins:
    """The chunks each live forked child can read, and the retired ones held for them.

    Before a fork, ``preparing`` records what the child will be able to read (held from
    then on: the map may change before the fork happens); after it, ``forked`` gives
    that record the child's key. Children are identified by any key the caller chooses
    (the relay uses the read end of the child's pipe); a key may be reused once
    ``exited`` was called for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[int, frozenset[int]] = {}  # child -> chunk ids it has mapped
        self._preparing: frozenset[int] | None = None  # for the child about to be forked
        self._held: dict[int, tuple[Any, Any]] = {}  # chunk id -> (ref, view)

    def preparing(self, cids: Iterable[int]) -> None:
        """Record that a child is about to be forked with chunks ``cids`` mapped.

        Parameters
        ----------
        cids : Iterable[int]
            Ids of the chunks mapped in this process for the fork.
        """
        with self._lock:
            self._preparing = frozenset(cids)

    def forked(self, child: int | None) -> None:
        """Give the record of ``preparing`` to the child just forked.

        Parameters
        ----------
        child : int or None
            The child's key; None if there is no child to keep (a fork this process
            did not prepare, or that failed).
        """
        with self._lock:
            cids, self._preparing = self._preparing, None
            if child is not None and cids is not None:
                self._children[child] = cids
            else:
                self._release_unneeded()

    def exited(self, child: int) -> None:
        """Forget ``child``; release the retired chunks no live child can read.

        Parameters
        ----------
        child : int
            The key given to ``forked`` (unknown keys are ignored).
        """
        with self._lock:
            if self._children.pop(child, None) is not None:
                self._release_unneeded()

    def _release_unneeded(self) -> None:
        needed = frozenset().union(self._preparing or (), *self._children.values())
        for cid in [c for c in self._held if c not in needed]:
            del self._held[cid]

    def retire(self, cid: int, ref: Any, view: Any) -> None:
        """Hold retired chunk ``cid`` if a live child can read it; otherwise drop it.

        Parameters
        ----------
        cid : int
            The chunk's id.
        ref : Any
            Its ObjectRef (keeps the object alive), or None.
        view : Any
            Its mapped chunk in this process (keeps the store from reusing its memory),
            or None.
        """
        with self._lock:
            mapped = [self._preparing or frozenset(), *self._children.values()]
            if any(cid in cids for cids in mapped):
                self._held[cid] = (ref, view)

    @property
    def held(self) -> int:
        """Number of retired chunks held for live children."""
        return len(self._held)

    @property
    def children(self) -> int:
        """Number of forked children recorded and not known to have exited."""
        return len(self._children)
