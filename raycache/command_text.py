"""Text the raycache command shares with raycache's messages: option values, command lines.

Messages of a training process (a cache that is gone, a full budget) and of the command
itself suggest ``raycache`` command lines; they must name the namespace and address the
user chose, or the suggested command looks elsewhere. The command's ``--timeout`` options
parse here too. It imports only the config's key table (standard library alone), so the
client and the command can both use it without importing each other.
"""

from __future__ import annotations

import argparse
import shlex

from raycache.config import RAYCACHE_KEYS

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_TIMEOUT_S",
    "positive_seconds",
    "seconds_text",
    "suggested_command",
]

DEFAULT_NAMESPACE = RAYCACHE_KEYS["namespace"].default
# A --timeout above this is taken as this: Ray's waits overflow far above it, and 1e9 s
# (31 years) already means "no limit".
MAX_TIMEOUT_S = 1e9


def positive_seconds(text: str) -> float:
    """Parse a ``--timeout`` value: a number of seconds greater than 0.

    Parameters
    ----------
    text : str
        The value given on the command line.

    Returns
    -------
    float
        The seconds, at most ``MAX_TIMEOUT_S`` (a larger value, ``inf`` included, means
        no limit and is taken as that).

    Raises
    ------
    argparse.ArgumentTypeError
        If ``text`` is not a number, or is 0, negative or NaN.
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return min(value, MAX_TIMEOUT_S)


def seconds_text(seconds: float) -> str:
    """Return ``seconds`` as a short number for a message: 5, 0.5, 1e-06.

    Parameters
    ----------
    seconds : float
        A duration in seconds.

    Returns
    -------
    str
        The number, without a unit.
    """
    return f"{seconds:.3g}"


def suggested_command(*words: str, namespace: str | None = None, address: str | None = None) -> str:
    """Return a ``raycache`` command line to suggest, with the Ray the user chose.

    A message that tells the user to run another command must name the namespace and
    address the user gave, or the suggested command would look elsewhere.

    Parameters
    ----------
    *words : str
        The command and its arguments, such as ``"drop", "cutouts-v1"``.
    namespace : str, optional
        The namespace used; added as ``--namespace`` unless it is the default.
    address : str, optional
        The Ray address the user gave; added as ``--address`` when given.

    Returns
    -------
    str
        The command line, quoted for a shell where needed.
    """
    parts = ["raycache", *words]
    if namespace is not None and namespace != DEFAULT_NAMESPACE:
        parts += ["--namespace", namespace]
    if address is not None:
        parts += ["--address", address]
    return " ".join(shlex.quote(part) for part in parts)
