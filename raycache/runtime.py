"""Connecting to Ray, and knowing when this process must not touch Ray at all.

A cache attaches to the Ray the user already runs (``raycache.address``, then a
running local instance, then ``RAY_ADDRESS``), and only when there is none starts an
embedded local Ray for this process, so the README's one command works on a laptop.

Ray is not fork-safe: a DataLoader worker forked from a process connected to Ray that
calls into Ray killed the node's raylet (RAY-FACTS). The fork hook below records that
this process is such a child, and raycache then makes no Ray call in it.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

__all__ = ["ensure_ray", "gcs_address", "in_forked_child"]

logger = logging.getLogger(__name__)

_forked_from_ray = False


def _after_fork_in_child() -> None:
    global _forked_from_ray
    if ray.is_initialized():
        _forked_from_ray = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def in_forked_child() -> bool:
    """Return True in a process forked from one connected to Ray (no Ray calls allowed)."""
    return _forked_from_ray


def ensure_ray(address: str | None = None) -> None:
    """Connect this process to Ray unless it already is.

    Parameters
    ----------
    address : str, optional
        Ray address (``"auto"``, ``"ray://..."``, ``"host:port"``). When None, attach
        to a running Ray if one is found, else start an embedded local Ray.

    Raises
    ------
    RuntimeError
        In a process forked from one connected to Ray, where Ray must not be used.
    """
    if _forked_from_ray:
        raise RuntimeError(
            "this process was forked from one connected to Ray, and Ray is not fork-safe; "
            "raycache makes no Ray call here"
        )
    if ray.is_initialized():
        return
    if address is None:
        address = _running_ray_address()
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    logger.info("raycache: no running Ray found; starting an embedded local Ray")
    ray.init(include_dashboard=False, logging_level=logging.WARNING)


def _running_ray_address() -> str | None:
    """Return the address of a Ray running on this machine that answers, or None.

    ``ray.init(address="auto")`` would also find one, but it trusts a stale
    ``ray_current_cluster`` file or a GCS that is shutting down, and then ends the
    whole process after 60 s. Checking that the GCS port accepts a connection first
    makes "attach if running, else start one" safe.
    """
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses

        candidates = [find_bootstrap_address(None), *reversed(find_gcs_addresses())]
    except Exception:  # private API moved: fall back to not attaching
        return None
    for candidate in candidates:
        if candidate and _reachable(candidate):
            return candidate
    return None


def _reachable(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def gcs_address() -> str:
    """Return the address another process uses to join this process's Ray cluster."""
    return ray.get_runtime_context().gcs_address
