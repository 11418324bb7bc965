"""Connecting to Ray: which Ray, within a bound, and never from a forked child.

Which Ray a process uses, in order:

1. the Ray this process is already connected to;
2. ``raycache.address`` (the ``address`` argument);
3. ``RAY_ADDRESS``;
4. a Ray started with ``ray start`` on this machine (its session file), if it answers;
5. the node Ray (:mod:`raycache.node_ray`): one Ray per user per node, started by the
   first raycache process that needs one and stopped when nothing needs it any more, so
   that processes given no Ray still share one cache;
6. only if the node Ray cannot be used: a private Ray for this process, with a warning
   that says why (other processes will not see its caches).

Every step is bounded: an address is first checked with a TCP connection (1 s), and
``ray.init`` runs with a deadline, so a stale address file or a dead head ends in
:class:`RayUnreachableError` within seconds instead of a hang.

Ray is not fork-safe: a DataLoader worker forked from a process connected to Ray that
calls into Ray killed the node's raylet (docs/design.md, "Ray facts"). The fork hook below
records that this process is such a child, and raycache then makes no Ray call in it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading

import ray

__all__ = [
    "NoRayRunningError",
    "RayUnreachableError",
    "attach_running",
    "ensure_ray",
    "find_running_ray",
    "gcs_address",
    "in_forked_child",
]

logger = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 1.0
INIT_TIMEOUT_S = 30.0

_forked_from_ray = False
_warned_private = False


class RayUnreachableError(ConnectionError):
    """A Ray address was given or found, but no Ray answers there."""


class NoRayRunningError(ConnectionError):
    """No Ray is running that this process could attach to (and none was to be started)."""


def _after_fork_in_child() -> None:
    global _forked_from_ray
    if ray.is_initialized():
        _forked_from_ray = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def in_forked_child() -> bool:
    """Return True in a process forked from one connected to Ray (no Ray calls allowed)."""
    return _forked_from_ray


def _check_not_forked() -> None:
    if _forked_from_ray:
        raise RuntimeError(
            "this process was forked from one connected to Ray, and Ray is not fork-safe; "
            "raycache makes no Ray call here"
        )


def ensure_ray(
    address: str | None = None,
    timeout: float = INIT_TIMEOUT_S,
    log_to_driver: bool = True,
    private_ok: bool = True,
) -> None:
    """Connect this process to Ray unless it already is.

    Parameters
    ----------
    address : str, optional
        Ray address (``"auto"``, ``"ray://..."``, ``"host:port"``). When None: the
        Ray named by ``RAY_ADDRESS``, else a ``ray start`` Ray on this machine, else the
        node Ray shared by this user's raycache processes (started if needed).
    timeout : float
        Seconds ``ray.init`` may take once the address answers.
    log_to_driver : bool
        Show the output of Ray workers and actors in this process (``ray.init``'s
        option); a command that summarises their errors itself turns it off.
    private_ok : bool
        Where the node Ray cannot be used, start a private Ray for this process (with a
        warning). False raises ``NoRayRunningError`` instead: for a caller whose caches
        must outlive it, which a private Ray's do not.

    Raises
    ------
    RuntimeError
        In a process forked from one connected to Ray, where Ray must not be used.
    RayUnreachableError
        If the given or found address does not answer.
    NoRayRunningError
        If ``private_ok`` is False and no Ray was found and the node Ray cannot be used.
    """
    _check_not_forked()
    if ray.is_initialized():
        return
    found = find_running_ray(address)
    if found is not None:
        found_here = _register_if_node_ray(found) or address is None
        _init(found, timeout, found_here=found_here, log_to_driver=log_to_driver)
        return
    from raycache import node_ray

    try:
        node_address = node_ray.attach(start=True)
    except node_ray.NodeRayError as exc:
        if not private_ok:
            message = f"no Ray is running and the node Ray is unavailable: {exc}"
            raise NoRayRunningError(message) from exc
        _start_private(str(exc), log_to_driver)
        return
    _init(node_address, timeout, found_here=True, log_to_driver=log_to_driver)


def find_running_ray(address: str | None = None) -> str | None:
    """Return the address of the Ray this process would attach to, starting nothing.

    Parameters
    ----------
    address : str, optional
        An explicit address; it is returned if it answers.

    Returns
    -------
    str or None
        An address that accepted a TCP connection, or None when no Ray was given and
        none is running (neither ``ray start``'s nor the node Ray).

    Raises
    ------
    RayUnreachableError
        If an address was given (argument, ``RAY_ADDRESS`` or ``"auto"``) or is recorded
        by ``ray start`` but nothing answers there.
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        where = "RAY_ADDRESS"
    else:
        where = "the given address"
    if address == "auto":
        address = _ray_start_address()
        if address is None:
            raise RayUnreachableError(
                "address 'auto' was given, but no Ray started with `ray start` is recorded "
                "on this machine"
            )
        where = "the Ray recorded by `ray start`"
    if address is not None:
        _check_answers(address, where)
        return address
    recorded = _ray_start_address()
    if recorded is not None:
        _check_answers(recorded, "the Ray recorded by `ray start` (its session file)")
        return recorded
    from raycache import node_ray

    try:
        record = node_ray.read_host(timeout=SOCKET_TIMEOUT_S)
    except node_ray.NodeRayError:  # not trusted; ensure_ray reports it when it attaches
        return None
    return None if record is None else str(record["address"])


def attach_running(address: str | None = None, timeout: float = 10.0) -> None:
    """Connect to a running Ray, never starting one (for inspection: the CLI, admin).

    Parameters
    ----------
    address : str, optional
        As for :func:`find_running_ray`.
    timeout : float
        Seconds ``ray.init`` may take once the address answers.

    Raises
    ------
    NoRayRunningError
        If no Ray is running.
    RayUnreachableError
        If the address does not answer or ``ray.init`` does not finish in time.
    """
    _check_not_forked()
    if ray.is_initialized():
        return
    found = find_running_ray(address)
    if found is None:
        raise NoRayRunningError(
            "no Ray is running on this machine (no RAY_ADDRESS, no `ray start`, no raycache "
            "node Ray); give --address to inspect another cluster"
        )
    found_here = _register_if_node_ray(found) or address is None
    _init(found, timeout, found_here=found_here)


def _register_if_node_ray(address: str) -> bool:
    """If ``address`` is this user's node Ray, count this process as its user; True then.

    A process may be handed the node Ray's address explicitly (a DDP rank told by rank
    0, a spawned DataLoader worker): it must hold the node Ray up like any other user,
    and authenticate as a process that found it itself.
    """
    from raycache import node_ray

    try:
        record = node_ray.read_host(timeout=SOCKET_TIMEOUT_S)
    except node_ray.NodeRayError:
        return False
    if record is None or record["address"] != address:
        return False
    return node_ray.attach(start=False) == address


def _ray_start_address() -> str | None:
    """Return the address ``ray start`` recorded on this machine, or None."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) or None
    except (ImportError, OSError):  # private API moved, or the file is unreadable
        return None


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachableError(f"Ray address {address!r} is not of the form host:port")
    return host.strip("[]"), int(port)


def _check_answers(address: str, where: str) -> None:
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S):
            return
    except OSError as exc:
        raise RayUnreachableError(
            f"no Ray answers at {address} ({where}): {exc.strerror or exc}; "
            "is that Ray still running?"
        ) from exc


def _is_loopback(address: str) -> bool:
    host, _ = _host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _init(address: str, timeout: float, found_here: bool, log_to_driver: bool = True) -> None:
    """Run ``ray.init(address)`` with a deadline.

    ``ray.init`` to an address that accepts connections but is no healthy GCS retries
    for about a minute and then ends the whole process; running it in a thread lets
    this process report the problem after ``timeout`` seconds instead.

    ``found_here``: the address was found on this machine (not given by the user). Ray
    turns token authentication on by itself when it finds a local Ray (``address=None``
    or ``"auto"``) and a token exists, but not for an address passed explicitly; the
    same rule is applied here, so that attaching to the node Ray or a ``ray start`` Ray
    authenticates as ``ray.init()`` would. Authentication is never turned off.
    """
    if _is_loopback(address):
        _keep_loopback()
    if found_here:
        _auth_as_ray_would_locally()
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
            outcome["error"] = None
        except BaseException as exc:  # handed to the waiting thread below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="raycache-ray-init", daemon=True)
    with _quiet_sigterm_warning():
        worker.start()
        worker.join(timeout)
    if "error" not in outcome:
        raise RayUnreachableError(
            f"Ray at {address} accepts connections but did not let this process join "
            f"within {timeout:.0f} s; is it a Ray GCS, and is it healthy?"
        )
    error = outcome["error"]
    if error is not None:
        raise RayUnreachableError(f"could not join the Ray at {address}: {error}") from error


def _auth_as_ray_would_locally() -> None:
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _keep_loopback() -> None:
    """Keep "127.0.0.1" as this node's address when joining a loopback-only Ray.

    Ray otherwise rewrites a loopback address into the machine's IP, where a Ray bound
    to 127.0.0.1 does not listen. Children (spawned DataLoader workers) inherit the
    environment variable and do the same.
    """
    from raycache.ray_settings import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


class _DropSigtermWarning(logging.Filter):
    """Drop Ray's note that it set no SIGTERM handler (ray.init runs in a thread here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class _quiet_sigterm_warning:
    def __enter__(self) -> None:
        self.filter = _DropSigtermWarning()
        logging.getLogger("ray._private.worker").addFilter(self.filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("ray._private.worker").removeFilter(self.filter)


def _start_private(reason: str, log_to_driver: bool = True) -> None:
    """Start a Ray of this process's own, saying once why the node Ray was not used."""
    global _warned_private
    if not _warned_private:
        _warned_private = True
        logger.warning(
            "raycache: using a private Ray for this process (other processes on this node "
            "will not share its caches) because the node Ray is unavailable: %s",
            reason,
        )
    from raycache.auth_token import before_starting_ray
    from raycache.ray_settings import EMBEDDED_SYSTEM_CONFIG

    _keep_loopback()
    before_starting_ray()  # the token Ray would make with the umask: made 0600 here
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
        _system_config=dict(EMBEDDED_SYSTEM_CONFIG),
    )


def gcs_address() -> str:
    """Return the address another process uses to join this process's Ray cluster."""
    return ray.get_runtime_context().gcs_address
