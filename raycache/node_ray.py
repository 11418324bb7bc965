"""One Ray per user per node, shared by every raycache process that is given no Ray.

A Ray that a process starts inside itself with ``ray.init()`` is invisible to every
other process, so two training scripts started side by side would each build a cache of
their own. Instead, the first raycache process of a user on a node that finds no Ray
starts a small detached *host* process (``python -m raycache.node_ray serve``); the host
starts Ray (loopback only, no dashboard) and writes its address to a file in a per-user
directory; every later process of that user on the node attaches to it.

What this module guarantees:

- **Race-free start.** Discovery and start happen under an exclusive ``flock`` on
  ``node.lock`` in the per-user directory (mode 0700, owned by the user, refused
  otherwise), so two processes started at the same instant end up on one Ray.
- **Nothing left behind.** Each attached process holds a shared ``flock`` on
  ``users.lock`` for as long as it lives (the kernel drops it when the process dies, even
  on SIGKILL). The host stops Ray and exits once nobody holds that lock *and* no raycache
  cache actor is left (a non-detached cache frees itself after ``raycache.linger_s``; a
  detached one keeps the Ray up until it is dropped), after a further linger period
  (``RAYCACHE_NODE_LINGER_S``, default 10 s). The final check and the removal of the
  address file happen under ``node.lock``, so no process can attach to a Ray that is
  about to stop.
- **Bounded.** Every wait (the lock, the host's start) has a timeout and ends in
  :class:`NodeRayError` with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raycache.auth_token import before_starting_ray
from raycache.ray_settings import EMBEDDED_SYSTEM_CONFIG, LOOPBACK_ENV

__all__ = [
    "NodeRayError",
    "attach",
    "host_linger_s",
    "node_dir",
    "read_host",
]

logger = logging.getLogger(__name__)

ADDRESS_FILE = "node.json"
START_LOCK = "node.lock"
USERS_LOCK = "users.lock"
HOST_LOG = "host.log"
# Starting Ray takes ~4 s on a quiet machine and several times that on a busy one.
START_TIMEOUT_S = 120.0
LOCK_TIMEOUT_S = 150.0  # longer than a start, which runs while the lock is held
POLL_S = 0.5
DEFAULT_LINGER_S = 10.0

# The shared lock on users.lock that marks this process as a user of the node Ray.
_users_fd: int | None = None


class NodeRayError(RuntimeError):
    """The node Ray could not be found or started; the message says why."""


def node_dir() -> Path:
    """Return the per-user directory that holds the node Ray's address and locks.

    ``RAYCACHE_NODE_DIR`` if set, else ``<tmp>/raycache-<uid>`` (``<tmp>`` is
    ``tempfile.gettempdir()``, which honours ``TMPDIR`` as Ray's own files do).

    Returns
    -------
    Path
        The directory (not created here).
    """
    explicit = os.environ.get("RAYCACHE_NODE_DIR")
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"raycache-{os.getuid()}"


def host_linger_s() -> float:
    """Return how long an idle node Ray stays up (``RAYCACHE_NODE_LINGER_S``, default 10).

    Returns
    -------
    float
        Seconds.

    Raises
    ------
    NodeRayError
        If the variable is set to something that is not a non-negative number.
    """
    raw = os.environ.get("RAYCACHE_NODE_LINGER_S")
    if raw is None:
        return DEFAULT_LINGER_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise NodeRayError(f"RAYCACHE_NODE_LINGER_S must be a number >= 0, got {raw!r}")
    return value


def _secure_dir(create: bool) -> Path | None:
    """Return the per-user directory after checking it is ours and private.

    Another user could create the directory first (it lives in a shared /tmp) and then
    read or replace the address file; so it must be a real directory owned by this uid
    with no group or other permissions.
    """
    path = node_dir()
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=False)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        raise NodeRayError(f"{path} is not a directory; remove it or set RAYCACHE_NODE_DIR")
    if info.st_uid != os.getuid():
        raise NodeRayError(
            f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()}); "
            "remove it or set RAYCACHE_NODE_DIR"
        )
    if info.st_mode & 0o077:
        raise NodeRayError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; it must be 700 (chmod 700 it)"
        )
    return path


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _flock(fd: int, mode: int, timeout: float, what: str) -> None:
    """Take ``flock(fd, mode)`` within ``timeout`` seconds, or raise NodeRayError."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise NodeRayError(f"cannot lock {what}: {exc}") from exc
        if time.monotonic() >= deadline:
            raise NodeRayError(f"{what} stayed locked for {timeout:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


@contextlib.contextmanager
def _start_lock(directory: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    fd = _open_lock(directory / START_LOCK)
    try:
        _flock(fd, fcntl.LOCK_EX, timeout, str(directory / START_LOCK))
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _reachable(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user reuses the PID
        return False
    return True


def read_host(directory: Path | None = None, timeout: float = 1.0) -> dict[str, Any] | None:
    """Return the running node Ray's record, or None if there is none that answers.

    Parameters
    ----------
    directory : Path, optional
        The per-user directory (default: :func:`node_dir`).
    timeout : float
        Seconds for the check that the Ray's GCS port accepts a connection.

    Returns
    -------
    dict or None
        ``address`` (GCS ``host:port``), ``pid`` (the host process), ``session_dir``;
        None when there is no record, its host is gone or its Ray does not answer.

    Raises
    ------
    NodeRayError
        If the per-user directory exists but is not private to this user.
    """
    if directory is None:
        # Only a directory private to this user is trusted to name the Ray to join.
        directory = _secure_dir(create=False)
        if directory is None:
            return None
    try:
        record = json.loads((directory / ADDRESS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not _alive(int(record.get("pid", 0))):
        return None
    if not _reachable(str(record.get("address", "")), timeout):
        return None
    return record


def _hold_users_lock(directory: Path) -> None:
    """Mark this process as a user of the node Ray until it exits."""
    global _users_fd
    if _users_fd is not None:
        return
    fd = _open_lock(directory / USERS_LOCK)
    try:
        # The host takes this lock exclusively for an instant to test for users.
        _flock(fd, fcntl.LOCK_SH, 10.0, str(directory / USERS_LOCK))
    except BaseException:
        os.close(fd)
        raise
    _users_fd = fd


def attach(start: bool = True) -> str | None:
    """Return the node Ray's address, starting the host when ``start`` and there is none.

    The calling process is registered as a user of that Ray until it exits.

    Parameters
    ----------
    start : bool
        Start the node Ray when none is running. With False (the CLI), return None
        instead.

    Returns
    -------
    str or None
        The GCS address (``127.0.0.1:port``), or None (only with ``start=False``).

    Raises
    ------
    NodeRayError
        When the directory is not private to this user, a lock is not obtained in time,
        or the host fails to start (the message has the end of its log).
    """
    directory = _secure_dir(create=start)
    if directory is None:
        return None
    with _start_lock(directory):
        record = read_host(directory)
        if record is None:
            if not start:
                return None
            with contextlib.suppress(FileNotFoundError):
                (directory / ADDRESS_FILE).unlink()  # a stale record: its host is gone
            record = _start_host(directory)
        # Registered before the start lock is released: the host decides to stop only
        # while holding that lock, so it sees this process as a user.
        _hold_users_lock(directory)
    return str(record["address"])


def _start_host(directory: Path) -> dict[str, Any]:
    """Start the host process and wait for its address record (start lock held)."""
    log_path = directory / HOST_LOG
    env = dict(os.environ, **LOOPBACK_ENV)
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raycache.node_ray", "serve", "--dir", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # not killed by the terminal's Ctrl-C with its starter
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise NodeRayError(
                f"the node Ray host exited with status {code} while starting: {_tail(log_path)}"
            )
        record = read_host(directory, timeout=0.5)
        if record is not None and record.get("pid") == proc.pid:
            logger.info("raycache: started the node Ray at %s", record["address"])
            return record
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=10)
    raise NodeRayError(f"the node Ray did not start within {START_TIMEOUT_S:.0f} s")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# ---------------------------------------------------------------------- the host


class _Host:
    """The host process: owns the node Ray and stops it once nothing needs it."""

    def __init__(self, directory: Path, linger_s: float):
        self.directory = directory
        self.linger_s = linger_s
        self.users_fd = _open_lock(directory / USERS_LOCK)
        self.stopping = False

    def users_idle(self) -> bool:
        """Return True when no process holds its shared lock on users.lock."""
        try:
            fcntl.flock(self.users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(self.users_fd, fcntl.LOCK_UN)
        return True

    @staticmethod
    def cache_actors() -> int:
        import ray

        names = ray.util.list_named_actors(all_namespaces=True)
        return sum(1 for a in names if str(a["name"]).startswith("raycache:"))

    def run(self) -> int:
        import ray

        # Ray replaces a loopback node address by the machine's IP unless told this
        # is not a cluster; then every server it starts binds 127.0.0.1 only.
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        before_starting_ray()  # the token Ray would make with the umask: made 0600 here
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            namespace="raycache-node",
            _system_config=dict(EMBEDDED_SYSTEM_CONFIG),
        )
        context = ray.get_runtime_context()
        record = {
            "address": context.gcs_address,
            "pid": os.getpid(),
            "session_dir": ray._private.worker._global_node.get_session_dir_path(),
            "started": time.time(),
        }
        tmp = self.directory / f".{ADDRESS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.directory / ADDRESS_FILE)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        idle_since: float | None = None
        try:
            while not self.stopping:
                time.sleep(POLL_S)
                if self.users_idle() and self.cache_actors() == 0:
                    now = time.monotonic()
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= self.linger_s and self._retire(record):
                        break
                else:
                    idle_since = None
        finally:
            self._remove_record(record)
            ray.shutdown()
        return 0

    def _retire(self, record: dict) -> bool:
        """Remove the address record if still idle, under the start lock; True if done."""
        try:
            with _start_lock(self.directory, timeout=5.0):
                if not (self.users_idle() and self.cache_actors() == 0):
                    return False
                self._remove_record(record)
                return True
        except NodeRayError:  # a start or attach holds the lock: not idle
            return False

    def _remove_record(self, record: dict) -> None:
        path = self.directory / ADDRESS_FILE
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if current.get("pid") == record["pid"]:
            path.unlink(missing_ok=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raycache.node_ray",
        description="Host the per-user node Ray (started by raycache; not run by hand).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start Ray and keep it while a raycache needs it")
    serve.add_argument("--dir", required=True, help="the per-user directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return _Host(Path(args.dir), host_linger_s()).run()


if __name__ == "__main__":
    raise SystemExit(_serve(sys.argv[1:]))
