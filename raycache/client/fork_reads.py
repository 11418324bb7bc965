"""A forked child's misses, answered by its parent: items stored since the fork, preload waits.

A forked DataLoader worker makes no Ray call (Ray is not fork-safe), so on its own it
sees only the chunks mapped at its fork: an item a preload stores afterwards would be
read again from the provider, and an index a preload unit is reading right now would
be read a second time instead of waited for. Its parent is attached and synced, so the
child asks it, over ``raycache.fork_requests``:

- ``lookup(indices, wait)``: once per batch with misses (``CacheClient.locate``), or per
  item on the item path. The parent answers every index it has (mapped, or buffered
  from its children's inserts) with the item's bytes; with ``wait``, it waits for the
  preload units reading the others, as it would for its own miss, under one bound for
  the whole question. The child keeps the answers for ``CacheClient.get``, which takes
  each once.
- ``reserve(indices)``: only while a preload runs. The parent reserves, under its own
  client id, the misses no unit holds; the child reads those. It remembers them per
  child and gives back the ones still missing when the child's socket closes (it died,
  or its epoch ended), so the preload never waits on an index nobody reads.

A warm epoch pays nothing (a hit never asks); a child filling the cache alone pays one
question per batch with misses (no preload: no ``reserve``). Every question has a
reply bound; if one fails, the child logs once and from then on reads its misses from
the provider, as it would without a parent.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from raycache import fork_requests
from raycache.client.preload_waits import INFLIGHT_WAIT_S

__all__ = ["ForkReads"]

logger = logging.getLogger(__name__)

# Extra seconds a child allows past the parent's own bound on a question: the reply's
# transfer and the parent's threads being busy.
REPLY_SLACK_S = 5.0


class ForkReads:
    """Both sides of a forked child's questions about one cache.

    Made in the parent with its client; a forked child inherits it and asks through it.

    Parameters
    ----------
    client : CacheClient
        The parent's client (held weakly).
    drain : Callable[[], None]
        Delivers what the parent's forked children have sent so far into its buffer.
    """

    def __init__(self, client: Any, drain: Callable[[], None]):
        self._client = weakref.ref(client)
        self._drain = drain
        self._timeout = float(client.timeout)
        self.token = fork_requests.register(self)
        self._lock = threading.Lock()
        self._reserved: dict[int, set[int]] = {}  # parent: per child, indices it reserved
        self._items: dict[int, Any] = {}  # child: answers not taken yet
        self._asked: dict[int, bool] = {}  # child: asked, and whether with wait
        self._held: set[int] = set()  # child: misses a preload unit is reading
        self._preloading: bool | None = None  # child: as the parent last said
        self._broken = False  # child: a question failed; read misses from the provider

    # ------------------------------------------------------------------ child side
    def prefetch(self, indices: np.ndarray, wait: bool) -> None:
        """Ask the parent once for a batch's misses (child side); ``take`` gets them.

        Parameters
        ----------
        indices : numpy.ndarray
            The batch's misses (int64).
        wait : bool
            Wait for preload units reading them (as ``CacheClient.get``).
        """
        self._items.clear()  # a new batch: what the last one did not take is stale
        self._asked.clear()
        self._held.clear()
        self._lookup(indices, wait)

    def take(self, idx: int, wait: bool) -> Any:
        """Return the parent's answer for miss ``idx`` (child side), asking if need be.

        A miss already asked about (with ``wait`` at least as strong) is not asked
        again. A miss waited for is asked together with the batch's other misses that
        a preload unit holds, so a batch waits in one question.

        Parameters
        ----------
        idx : int
            The index.
        wait : bool
            Wait for a preload unit reading it.

        Returns
        -------
        Any
            The item, or None: the caller reads it from the provider.
        """
        item = self._items.pop(idx, None)
        if item is not None:
            return item
        asked = self._asked.pop(idx, None)
        if asked is not None and (asked or not wait):
            return None
        batch = [idx]
        if wait:
            batch += [i for i in self._held if i != idx and not self._asked.get(i)]
        self._lookup(np.asarray(batch, dtype=np.int64), wait)
        self._asked.pop(idx, None)
        return self._items.pop(idx, None)

    def being_preloaded(self, indices: np.ndarray, preloading: bool) -> np.ndarray:
        """Return, per miss, whether a preload unit holds it (child side).

        The others are reserved for this child by its parent; the caller reads them.

        Parameters
        ----------
        indices : numpy.ndarray
            The misses (int64).
        preloading : bool
            Whether a preload ran at the fork (used until the parent says otherwise).

        Returns
        -------
        numpy.ndarray
            A bool per index: wait for it (True) or read it (False).
        """
        running = preloading if self._preloading is None else self._preloading
        none = np.zeros(len(indices), dtype=bool)
        if not running or not len(indices):
            return none
        reply = self._ask("reserve", indices, timeout=self._timeout + REPLY_SLACK_S)
        if reply is None:
            return none
        held, self._preloading = reply
        self._held.update(indices[held].tolist())
        return held

    def _lookup(self, indices: np.ndarray, wait: bool) -> None:
        bound = (INFLIGHT_WAIT_S + self._timeout) * (2 if wait else 1)
        reply = self._ask("lookup", indices, wait, timeout=bound + REPLY_SLACK_S)
        if reply is None:
            return
        items, self._preloading = reply
        for i, item in zip(indices.tolist(), items):
            self._asked[i] = wait
            if wait:
                self._held.discard(i)
            if item is not None:
                self._items[i] = item

    def _ask(self, op: str, *args: Any, timeout: float) -> Any:
        """Ask the parent; None (and the provider from then on) if that fails."""
        if self._broken:
            return None
        try:
            return fork_requests.ask_parent(self.token, op, *args, timeout=timeout)
        except fork_requests.ChildLinkError as exc:
            self._broken = True
            logger.warning(
                "raycache: this forked worker cannot ask its parent about cache misses "
                "(%s); from now on it reads them from the provider",
                exc,
            )
            return None

    # ------------------------------------------------------------------ parent side
    def answer_for(self, child: int, op: str, *args: Any) -> Any:
        """Answer one child's question (parent side, on a pool thread).

        Parameters
        ----------
        child : int
            The child's key (``raycache.fork_requests``).
        op : str
            ``"lookup"`` or ``"reserve"``.
        *args : Any
            The question's arguments.

        Returns
        -------
        Any
            ``(items, preloading)`` for a lookup, ``(held, preloading)`` for a reserve.
        """
        client = self._client()
        usable = client is not None and not client.closed and not client.dead
        if op == "lookup":
            indices, wait = args
            if not usable:
                return [None] * len(indices), False
            return self._answer_lookup(client, indices, wait), client.preloading
        if op == "reserve":
            (indices,) = args
            if not usable:
                return np.zeros(len(indices), dtype=bool), False
            held = client.waits.being_preloaded(indices)
            if client.preloading:
                with self._lock:
                    self._reserved.setdefault(child, set()).update(indices[~held].tolist())
            return held, client.preloading
        raise ValueError(f"unknown question {op!r} from a forked worker: lookup or reserve")

    def quick(self, op: str, *args: Any) -> bool:
        """Return True for a question answered without waiting: a lookup without ``wait``.

        Parameters
        ----------
        op : str
            The question.
        *args : Any
            Its arguments.

        Returns
        -------
        bool
            Whether ``raycache.fork_requests`` may answer it on its reading thread.
        """
        return op == "lookup" and not args[1]

    def _answer_lookup(self, client: Any, indices: np.ndarray, wait: bool) -> list:
        """Return the item or None per index; with ``wait``, within one bound in all."""
        self._drain()  # what the children sent may answer a sibling's miss
        deadline = time.monotonic() + INFLIGHT_WAIT_S + self._timeout
        loc = client.locate(indices, wait=False)
        out = []
        for i, where in zip(indices.tolist(), loc.tolist()):
            waits = wait and where < 0 and time.monotonic() < deadline
            # Views: pickling the reply copies their bytes.
            out.append(client.get(i, copy=False, wait=waits))
        return out

    def child_gone(self, child: int) -> None:
        """Give back what ``child`` reserved and has not stored (parent side).

        Parameters
        ----------
        child : int
            The child's key.
        """
        with self._lock:
            reserved = self._reserved.pop(child, None)
        client = self._client()
        if not reserved or client is None or client.closed or client.dead:
            return
        if not client.preloading:
            return  # nothing waits on reservations once the preload ended
        client.flush()  # what the child read and sent is stored before the rest is given back
        indices = np.fromiter(sorted(reserved), dtype=np.int64, count=len(reserved))
        left = indices[client.locate(indices, wait=False) < 0]
        if len(left):
            client.waits.release_reserved(left.tolist())
