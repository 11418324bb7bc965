"""Claims on missing items, so that no item is read from the provider twice at once.

Hyrax reads an item on a miss and inserts it after: between the two, any other process
(a DDP rank, a DataLoader worker) that misses the same index reads it again. Samplers
that draw with replacement (Hyrax's train sampler does) make that common. A claim closes
the gap: the first process to miss an index claims it and reads it; the others wait
until the claimer has stored it (``done``), then fetch it.

The claims live in one small asyncio actor per Ray namespace (``ClaimBoard``), shared by
every cache: a claim is a key ``(cache name, index)``. The actor is detached, so it does
not die with the process that happened to create it; it holds no data and no CPU, only
the claims in flight, and stays until the Ray cluster ends. A claim expires after
``CLAIM_TTL_S``, so a claimer that died does not block the others for longer than that;
a wait returns after its timeout whatever happened, and the waiter then reads the item
itself: a claim saves reads, it never makes a reader fail.

A claim ended a moment ago is remembered for ``ENDED_KEEP_S``: a process whose map was
last brought up to date just before the claimer stored the item misses it, and would
otherwise find no claim and read it again; told ``STORED``, it brings its map up to date
and fetches the item instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

__all__ = ["CLAIM_TTL_S", "ENDED_KEEP_S", "HELD", "MINE", "STORED", "ClaimBoard", "board"]

CLAIM_TTL_S = 60.0
ENDED_KEEP_S = 10.0
# What ``ClaimBoard.claim`` answers: the index is the caller's to read; another process
# reads it now; another process stored it a moment ago.
MINE, HELD, STORED = "mine", "held", "stored"
# The version is in the name: the board is detached, so a board made by an older
# raycache may still be running in the cluster, with other methods.
BOARD_NAME = "raycache-hyrax-claims-v3"


@ray.remote(num_cpus=0, max_concurrency=1000)
class ClaimBoard:
    """Who is reading which ``(cache, index)`` now. Created through ``board``."""

    def __init__(self) -> None:
        self._claims: dict[tuple[str, int], tuple[str, float, asyncio.Event]] = {}
        self._ended: dict[tuple[str, int], float] = {}  # key -> when, oldest first

    async def claim(self, cache: str, idx: int, owner: str, stored_counts: bool = True) -> str:
        """Claim ``(cache, idx)`` for ``owner`` unless another process reads or stored it.

        Parameters
        ----------
        cache : str
            The cache name.
        idx : int
            The index.
        owner : str
            Who claims (a process or client id).
        stored_counts : bool
            Answer ``STORED`` for a claim ended within ``ENDED_KEEP_S``; False claims it
            then (the caller looked, and the item is not in the cache).

        Returns
        -------
        str
            ``MINE`` when no unexpired claim is held on it (it is now the owner's),
            ``HELD`` when one is, ``STORED`` when a claim on it ended a moment ago.
        """
        key = (cache, int(idx))
        held = self._claims.get(key)
        now = time.monotonic()
        # Exclusive even for the same owner: a parent claims for each of its forked
        # workers under its own name, and two of them must not both read.
        if held is not None and held[1] > now:
            return HELD
        if stored_counts and self._ended.get(key, -ENDED_KEEP_S) > now - ENDED_KEEP_S:
            return STORED
        event = held[2] if held is not None else asyncio.Event()
        self._claims[key] = (owner, now + CLAIM_TTL_S, event)
        return MINE

    async def done(self, cache: str, idx: int) -> None:
        """End the claim on ``(cache, idx)``: it is stored (or will not be); wake waiters."""
        await self.done_many(cache, [idx])

    async def done_many(self, cache: str, indices: list[int]) -> None:
        """End the claims on several indices of ``cache`` (see ``done``)."""
        now = time.monotonic()
        for idx in indices:
            key = (cache, int(idx))
            held = self._claims.pop(key, None)
            if held is not None:
                held[2].set()
            self._ended.pop(key, None)
            self._ended[key] = now
        while self._ended:  # forget the oldest ends
            oldest = next(iter(self._ended))
            if self._ended[oldest] > now - ENDED_KEEP_S:
                break
            del self._ended[oldest]

    async def wait(self, cache: str, idx: int, timeout: float) -> bool:
        """Wait until the claim on ``(cache, idx)`` ends, at most ``timeout`` s.

        Returns
        -------
        bool
            True if no claim is held (any more); False on timeout.
        """
        held = self._claims.get((cache, int(idx)))
        if held is None:
            return True
        left = min(timeout, held[1] - time.monotonic())
        try:
            await asyncio.wait_for(held[2].wait(), max(left, 0.0))
        except asyncio.TimeoutError:
            return False
        return True


def board(namespace: str) -> Any:
    """Return the claim board of ``namespace``, creating it if no process has yet.

    Call only in a process connected to Ray.

    Parameters
    ----------
    namespace : str
        The caches' Ray namespace.

    Returns
    -------
    ray.actor.ActorHandle
        The board.
    """
    return ClaimBoard.options(
        name=BOARD_NAME, namespace=namespace, lifetime="detached", get_if_exists=True
    ).remote()
