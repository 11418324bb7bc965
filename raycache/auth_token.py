"""Ray's token file, readable by its owner only, wherever raycache starts a Ray.

Ray 2.60 turns token authentication on for every Ray that ``ray.init()`` starts and,
when no token exists, writes one to ``~/.ray/auth_token`` with the process's umask:
with the usual umask 022 every local account can read the token, which is all a local
user needs to run code on the Ray. raycache starts Rays of its own (the node Ray, a
private Ray), so before each start it makes the token itself, mode 0600 in a ``~/.ray``
it creates 0700, and takes an existing ``~/.ray/auth_token`` of the user's that others
can read back to 0600 (logging that it did). Ray then finds the token and uses it.

What this module never does: turn authentication off; touch a token that
``RAY_AUTH_TOKEN`` (in the environment) or ``RAY_AUTH_TOKEN_PATH`` (a file the user
chose) provides; change a file the user does not own, or follow a symbolic link; change
the mode of a ``~/.ray`` it did not create.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

__all__ = ["TOKEN_MODE", "before_starting_ray", "default_token_path", "prepare_token"]

logger = logging.getLogger(__name__)

TOKEN_MODE = 0o600  # read and write by the owner only
DIR_MODE = 0o700


def default_token_path() -> Path:
    """Return where Ray looks for its token by default, ``~/.ray/auth_token``.

    Returns
    -------
    Path
        The token file's path (it may not exist).
    """
    return Path.home() / ".ray" / "auth_token"


def _token_from_elsewhere() -> bool:
    """Return True where the user's environment, not ``~/.ray``, decides the token."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return True  # the user's explicit choice: no token file is read
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))


def _make_dir(directory: Path) -> None:
    """Create ``directory`` 0700 unless it exists (whose mode is then left as it is)."""
    try:
        directory.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return
    os.chmod(directory, DIR_MODE)  # the umask may have taken bits from mkdir's mode


def _write_new(path: Path) -> bool:
    """Write a new random token to ``path`` (which must not exist), mode 0600.

    Returns False when another process created the file first.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TOKEN_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, TOKEN_MODE)  # exactly 0600, whatever the umask
        # The same form as Ray's own tokens: 256 random bits in hex.
        os.write(fd, secrets.token_hex(32).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _repair(path: Path) -> bool:
    """Take an existing token of this user's that others can read back to 0600."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        return False  # a link or someone else's file: not ours to change
    if stat.S_IMODE(info.st_mode) & 0o077 == 0:
        return False
    os.chmod(path, TOKEN_MODE, follow_symlinks=False)
    logger.warning(
        "raycache: Ray's token %s was readable by other accounts (mode %o); made it 0600",
        path,
        stat.S_IMODE(info.st_mode),
    )
    return True


def prepare_token(path: Path | None = None) -> str:
    """Make Ray's token file private before raycache starts a Ray.

    Parameters
    ----------
    path : Path, optional
        The token file; None: ``default_token_path()``.

    Returns
    -------
    str
        What was done: ``"created"`` (a new token, 0600), ``"repaired"`` (an existing
        one made 0600), ``"kept"`` (it was private already, or is not this user's
        regular file) or ``"not used"`` (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` or
        ``RAY_AUTH_TOKEN_PATH`` decide the token; nothing was touched).

    Raises
    ------
    OSError
        If the directory or the file cannot be created or changed (for example a
        read-only home directory); the message names the path.
    """
    if path is None:
        if _token_from_elsewhere():
            return "not used"
        path = default_token_path()
    _make_dir(path.parent)
    if _write_new(path):
        return "created"
    return "repaired" if _repair(path) else "kept"


def before_starting_ray() -> None:
    """Run ``prepare_token`` where raycache is about to start a Ray.

    A token that cannot be made private (a read-only home directory) is reported with a
    warning and left to Ray, which then makes or reads it as it would without raycache:
    the Ray still starts, with authentication on.
    """
    try:
        prepare_token()
    except OSError as exc:
        logger.warning(
            "raycache: could not make Ray's token file private (%s); check its mode with "
            "`ls -l %s` and run `chmod 600` on it",
            exc,
            default_token_path(),
        )
