"""A client's line to its directory actor, and the one place that decides it is lost.

Every remote call a client makes goes through ``ActorLink``: a failed call (the actor
died, a call timed out, Ray was shut down) marks the cache lost for this process, once,
with one warning, and the caller gets ``LOST`` instead of an exception. From then on
the process reads from its provider: a training run outlives its cache.

After ``ray.shutdown()`` any Ray call would silently start a new local Ray, so the
link checks ``ray.is_initialized()`` before it calls (``usable``).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

__all__ = ["LOST", "ActorLink"]

logger = logging.getLogger(__name__)


class _Lost:
    """The value of a call that failed (the cache is lost)."""

    def __repr__(self) -> str:
        return "LOST"


LOST: Any = _Lost()


class ActorLink:
    """The directory actor's handle, the call timeout, and whether the cache is usable.

    Parameters
    ----------
    actor : ray.actor.ActorHandle
        The directory actor.
    client_id : str
        This client's id, which the actor knows it by.
    name : str
        The cache name, for messages.
    timeout : float
        Seconds a reply may take.
    """

    def __init__(self, actor: Any, client_id: str, name: str, timeout: float):
        self.actor = actor
        self.client_id = client_id
        self.name = name
        self.timeout = timeout
        self.dead = False  # the cache is lost for this process
        self.forked = False  # this is a forked child, which must make no Ray call

    def usable(self) -> bool:
        """Return True if this process may call the actor now."""
        if self.dead or self.forked:
            return False
        if not ray.is_initialized():
            self.dead = True
            return False
        return True

    def submit(self, method: str, *args: Any) -> Any:
        """Call actor method ``method`` without waiting; its ref, or ``LOST``."""
        try:
            return getattr(self.actor, method).remote(*args)
        except Exception as exc:
            self.lost(exc)
            return LOST

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        """Return the reply ``ref`` within ``timeout`` (default: the link's), or ``LOST``."""
        if ref is LOST:
            return LOST
        try:
            return ray.get(ref, timeout=self.timeout if timeout is None else timeout)
        except Exception as exc:
            self.lost(exc)
            return LOST

    def call(self, method: str, *args: Any) -> Any:
        """Call actor method ``method`` and return its reply, or ``LOST``."""
        return self.get(self.submit(method, *args))

    def lost(self, exc: BaseException) -> None:
        """Record that the cache cannot be used any more, once, and say so.

        Parameters
        ----------
        exc : BaseException
            What went wrong.
        """
        if isinstance(exc, GetTimeoutError):
            logger.warning("raycache %s: call timed out after %.1fs", self.name, self.timeout)
        if self.dead:
            return
        self.dead = True
        logger.warning(
            "raycache %s: cache unavailable (%s: %s); reading from the provider from now on",
            self.name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
