"""A client's line to its directory actor, and the one place that decides it is lost.

Every remote call a client makes goes through ``ActorLink``: a failed call (the actor
died, a call timed out, Ray was shut down) marks the cache lost for this process, once,
with one warning, and the caller gets ``LOST`` instead of an exception. From then on
the process reads from its provider: a training run outlives its cache.

After ``ray.shutdown()`` any Ray call would silently start a new local Ray, so the
link checks ``ray.is_initialized()`` before it calls (``usable``).

An insert's reply says how many items did not fit the cache's byte budget; the first
such reply in a process is logged once, with the figures (``BudgetNotice``), not once
per insert: a cache smaller than its data is slower, not broken.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from raycache.command_text import suggested_command
from raycache.config import CacheConfig
from raycache.directory import directory_actor
from raycache.errors import CacheUnavailableError
from raycache.protocol import Settings

__all__ = ["LOST", "ActorLink", "BudgetNotice", "cache_spec", "link_to_directory"]

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
    max_bytes : int, optional
        The cache's byte budget, for the message when it is full.
    """

    def __init__(
        self,
        actor: Any,
        client_id: str,
        name: str,
        timeout: float,
        max_bytes: int | None = None,
        namespace: str | None = None,
    ):
        self.actor = actor
        self.client_id = client_id
        self.name = name
        self.namespace = namespace
        self.timeout = timeout
        self.budget = BudgetNotice(name, max_bytes, namespace)
        self.dead = False  # the cache is lost for this process
        self.reason = ""  # why, once dead
        self.forked = False  # this is a forked child, which must make no Ray call

    def usable(self) -> bool:
        """Return True if this process may call the actor now."""
        if self.dead or self.forked:
            return False
        if not ray.is_initialized():
            self.dead = True
            self.reason = self.reason or "ray.shutdown() was called in this process"
            return False
        return True

    def unavailable(self) -> CacheUnavailableError:
        """Return the error for a call this process cannot make, saying why.

        Returns
        -------
        CacheUnavailableError
            Names the cache and the cause: the actor died or was dropped, a call timed
            out, Ray was shut down here, or this is a forked child.
        """
        if self.forked and not self.dead:
            why = "this process was forked from one attached to Ray, and makes no Ray call"
        else:
            why = self.reason or "it did not answer"
        listing = suggested_command("list", namespace=self.namespace)
        return CacheUnavailableError(
            f"cache {self.name!r} is gone or unreachable from this process ({why}); "
            f"reads here come from the provider. '{listing}' shows whether it exists; "
            "attach again (a new DataCache) to make a new one"
        )

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
        reply = self.get(self.submit(method, *args))
        if method in ("insert", "insert_staged") and reply is not LOST and reply is not None:
            self.budget.note(reply.rejected, args[0])
        return reply

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
        self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        logger.warning(
            "raycache %s: cache unavailable (%s: %s); reading from the provider from now on",
            self.name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )


class BudgetNotice:
    """Says once per process that the cache is full, with the figures.

    Parameters
    ----------
    name : str
        The cache name.
    max_bytes : int or None
        The cache's byte budget.

    Attributes
    ----------
    rejected : int
        Items this process sent that did not fit, over every insert.
    """

    def __init__(self, name: str, max_bytes: int | None, namespace: str | None = None):
        self.name = name
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.rejected = 0

    def note(self, rejected: int, chunks: Any) -> None:
        """Count ``rejected`` items of an insert of ``chunks``; warn at the first.

        Parameters
        ----------
        rejected : int
            Items of the insert the actor did not store (over ``max_bytes``).
        chunks : list of Chunk
            What was sent, for the size of an item.
        """
        if not rejected:
            return
        first = self.rejected == 0
        self.rejected += rejected
        if not first:
            return
        items = sum(len(chunk) for chunk in chunks)
        nbytes = sum(int(chunk.nbytes) for chunk in chunks)
        budget = "unknown" if self.max_bytes is None else f"{self.max_bytes:,} bytes"
        logger.warning(
            "raycache %s: the cache is full: its byte budget (raycache.max_bytes = %s) is "
            "used; %d of %d items just sent (about %s bytes each) were not cached and are "
            "read from the provider every epoch. Raise raycache.max_bytes or the object "
            "store's size (docs/troubleshooting.md); a cache keeps the max_bytes of the "
            "process that created it, so drop it first ('%s'). "
            "stats()['rejected_items'] counts them from now on, without another warning.",
            self.name,
            budget,
            rejected,
            items,
            f"{nbytes // max(items, 1):,}",
            suggested_command("drop", self.name, namespace=self.namespace),
        )


def cache_spec(config: CacheConfig, name: str, length: int, fingerprint: str) -> dict:
    """Return what a client tells the directory actor: who it is, and how to create it.

    Parameters
    ----------
    config : CacheConfig
        The client's settings.
    name : str
        The cache name.
    length : int
        Number of provider items.
    fingerprint : str
        The provider's description, checked against the cache's.

    Returns
    -------
    dict
        The actor's creation arguments, also compared at attach.
    """
    return {
        "name": name,
        "length": length,
        "fingerprint": fingerprint,
        "chunk_size": config.chunk_size,
        "chunk_bytes": config.chunk_bytes,
        "max_bytes": config.max_bytes,
        "detached": config.detached,
        "linger_s": config.linger_s,
        "log_dir": config.log_dir,
        "locality": config.locality,
    }


def link_to_directory(
    config: CacheConfig, spec: dict, client_id: str, info: dict
) -> tuple[Any, Settings, ActorLink]:
    """Attach ``client_id`` to the cache's actor, creating it if it does not exist.

    Parameters
    ----------
    config : CacheConfig
        The client's settings (namespace, timeout, preload).
    spec : dict
        ``cache_spec``'s value.
    client_id : str
        The client's unique id.
    info : dict
        Host and pid, for ``stats()``.

    Returns
    -------
    tuple
        The actor's handle, the cache's settings and the link over which the client
        makes every later call.

    Raises
    ------
    CacheMismatchError
        If the cache holds other data (from the actor, as a ``RayTaskError``).
    RayActorError
        If the actor died three times while this process attached.
    """
    name, timeout = spec["name"], float(config.timeout_s)
    if config.use_cache and config.preload_cache:
        _prestart_preload(config, name, int(spec["length"]))
    # The actor may be freeing itself (linger expired) at this moment: try again,
    # and a fresh actor is created under the same name.
    for attempt in range(3):
        actor = directory_actor(name, config.namespace, spec)
        try:
            settings = ray.get(actor.attach.remote(client_id, info, spec), timeout=timeout)
        except RayActorError:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
            continue
        _warn_other_budget(name, config.namespace, config.max_bytes, settings.max_bytes)
        link = ActorLink(actor, client_id, name, timeout, settings.max_bytes, config.namespace)
        return actor, settings, link
    raise RuntimeError(f"cache {name!r}: could not attach")


def _warn_other_budget(
    name: str, namespace: str | None, asked: int | None, cache_has: int | None
) -> None:
    """Say so when this process set ``max_bytes`` and the cache it attached to has another.

    A cache's settings are its creator's; a later process's ``max_bytes`` would
    otherwise be ignored without a word.
    """
    if asked is None or cache_has is None or int(asked) == int(cache_has):
        return
    logger.warning(
        "raycache %s: the cache exists with raycache.max_bytes = %s, set by the process "
        "that created it; this process's %s is not used. Drop the cache ('%s') to create "
        "it with another budget.",
        name,
        f"{int(cache_has):,}",
        f"{int(asked):,}",
        suggested_command("drop", name, namespace=namespace),
    )


def _prestart_preload(config: CacheConfig, name: str, length: int) -> None:
    """Where this process creates a cache that will preload, start its readers now.

    Ray then starts the preload's worker processes while the actor starts
    (``raycache.preload.prestart_readers``); a process attaching to a cache that
    exists starts nothing.
    """
    try:
        directory_actor(name, config.namespace)
        return
    except ValueError:
        pass  # no such cache yet: this process creates it
    from raycache.preload.prestart import prestart_readers

    prestart_readers(config.preload_threads, length, config.preload_cpus)
