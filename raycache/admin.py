"""Finding, inspecting and dropping caches by name, from any process.

These calls inspect a Ray that is running; they never start one (a Ray started only to
find that it holds no cache would cost seconds and tell nothing). With no Ray running
they raise :class:`~raycache.runtime.NoRayRunningError`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from raycache.config import RAYCACHE_KEYS
from raycache.directory import directory_actor
from raycache.runtime import attach_running

__all__ = ["cache_stats", "cache_summaries", "drop_cache", "list_caches"]

logger = logging.getLogger(__name__)

_PREFIX = "raycache:"
# ``ray.kill`` returns before the GCS has freed the actor's name; a drop waits up to this
# long for it, so that the name is free (and a second drop finds nothing) once it returns.
NAME_FREED_TIMEOUT_S = 10.0
_DEFAULT_NS = RAYCACHE_KEYS["namespace"].default


def drop_cache(
    name: str, namespace: str = _DEFAULT_NS, address: str | None = None, timeout: float = 30.0
) -> bool:
    """Free a cache and its directory actor, whoever created it.

    Clients still attached notice on their next read and fall back to the provider.

    Parameters
    ----------
    name : str
        The cache name.
    namespace : str
        Its Ray namespace.
    address : str, optional
        Ray address; by default the running Ray.
    timeout : float
        Seconds to wait for the actor to free its chunks before it is killed anyway.

    Returns
    -------
    bool
        True if the cache existed. Once this returns, the name is free: a new cache by
        that name starts a new actor, and another drop returns False.

    Raises
    ------
    NoRayRunningError
        If no Ray is running (and so no cache).
    """
    attach_running(address)
    try:
        actor = directory_actor(name, namespace)
    except ValueError:
        return False
    try:
        ray.get(actor.drop.remote(), timeout=timeout)
    except Exception:  # the actor is gone or stuck: killing it frees its objects anyway
        pass
    ray.kill(actor, no_restart=True)
    _await_name_freed(name, namespace, actor)
    return True


def _await_name_freed(name: str, namespace: str, killed: Any) -> None:
    """Return once the killed actor no longer answers to cache ``name`` (or on timeout)."""
    deadline = time.monotonic() + NAME_FREED_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            found = directory_actor(name, namespace)
        except ValueError:
            return
        if found._actor_id != killed._actor_id:  # a new cache of that name started since
            return
        if time.monotonic() >= deadline:
            logger.warning(
                "raycache: cache %r was killed, but Ray still lists its actor after %.0f s",
                name,
                NAME_FREED_TIMEOUT_S,
            )
            return
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


def list_caches(namespace: str | None = _DEFAULT_NS, address: str | None = None) -> list[str]:
    """Return the names of the caches on the cluster.

    Parameters
    ----------
    namespace : str or None
        Only this namespace; None lists every namespace.
    address : str, optional
        Ray address; by default the running Ray.

    Returns
    -------
    list of str
        Cache names, sorted.

    Raises
    ------
    NoRayRunningError
        If no Ray is running.
    """
    attach_running(address)
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"][len(_PREFIX) :]
        for a in actors
        if a["name"].startswith(_PREFIX) and (namespace is None or a["namespace"] == namespace)
    )


def cache_stats(
    name: str, namespace: str = _DEFAULT_NS, address: str | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """Return a cache's counters without attaching to it.

    Parameters
    ----------
    name : str
        The cache name.
    namespace : str
        Its Ray namespace.
    address : str, optional
        Ray address; by default the running Ray.
    timeout : float
        Seconds to wait for the answer.

    Returns
    -------
    dict
        As ``DataCache.stats()``, without the ``client`` entry.

    Raises
    ------
    ValueError
        If there is no such cache.
    ray.exceptions.GetTimeoutError
        If the cache did not answer within ``timeout`` seconds.
    NoRayRunningError
        If no Ray is running.
    """
    attach_running(address)
    return ray.get(directory_actor(name, namespace).stats.remote(), timeout=timeout)


def cache_summaries(
    namespace: str | None = _DEFAULT_NS, address: str | None = None, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Return one line of figures per cache: name, size and clients.

    The caches are asked all at once and each answer is awaited at most ``timeout``
    seconds, so one stuck cache delays the listing by that much, not forever.

    Parameters
    ----------
    namespace : str or None
        Only this namespace; None lists every namespace.
    address : str, optional
        Ray address; by default the running Ray.
    timeout : float
        Seconds to wait for the caches' answers.

    Returns
    -------
    list of dict
        Sorted by namespace and name; each has ``name``, ``namespace``, and from the
        cache's stats ``length``, ``items``, ``bytes``, ``clients``, ``detached`` and
        ``preload`` (its state), or ``error`` when the cache did not answer: ``no
        answer in S s`` when it did not answer within ``timeout``, else the error's
        type and first line.

    Raises
    ------
    NoRayRunningError
        If no Ray is running.
    """
    attach_running(address)
    actors = sorted(
        (a["namespace"], a["name"][len(_PREFIX) :])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(_PREFIX) and (namespace is None or a["namespace"] == namespace)
    )
    asked = []
    for ns, name in actors:
        try:
            asked.append((ns, name, directory_actor(name, ns).stats.remote()))
        except ValueError:  # freed between the listing and the lookup
            continue
    deadline = time.monotonic() + timeout
    rows = []
    for ns, name, ref in asked:
        row: dict[str, Any] = {"name": name, "namespace": ns}
        try:
            stats = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            row["error"] = f"no answer in {timeout:.3g} s"
        except Exception as exc:  # reported per cache: one dead cache must not hide the rest
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            for key in ("length", "items", "bytes", "clients", "detached"):
                row[key] = stats.get(key)
            preload = stats.get("preload")
            row["preload"] = preload.get("state") if isinstance(preload, dict) else preload
        rows.append(row)
    return rows
