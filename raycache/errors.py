"""Exceptions raycache raises, in one place so users can catch them by type.

Where Hyrax's seed raised a built-in type (``RuntimeError`` for a bad index type or an
unsupported value, ``IndexError`` for an index out of range), raycache raises that type
or a subclass of it, so code written against the seed keeps working.

Every raycache exception pickles with its message, and every error that comes out of a
Ray call can be turned into a plain exception of the original type (:func:`plain_error`,
:func:`ray_errors_as_plain`). Why: Ray re-raises a remote error as an instance of a class
it builds at run time, ``RayTaskError(CacheMismatchError)``, which cannot be pickled by
reference. A spawned DataLoader worker sends its errors to the parent by pickling their
class; with such a class that fails, and the DataLoader waits for the worker forever.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator

from ray.exceptions import RayActorError, RayTaskError

from raycache.config import ConfigError
from raycache.values import UnsupportedValueError

__all__ = [
    "CacheMismatchError",
    "CacheUnavailableError",
    "ConfigError",
    "PreloadFailedError",
    "ProviderNotPicklableError",
    "RemoteError",
    "UnsupportedValueError",
    "note_provider_index",
    "plain_error",
    "ray_errors_as_plain",
]


class CacheMismatchError(ValueError):
    """A cache name is already used by a cache of a different provider or length."""


class ProviderNotPicklableError(TypeError):
    """The provider cannot be pickled, so Ray tasks cannot run it to preload."""


class CacheUnavailableError(RuntimeError):
    """The cache's directory actor is gone or did not answer in time."""


class PreloadFailedError(RuntimeError):
    """A preload ended without storing anything: every read failed, or the run did."""


class RemoteError(RuntimeError):
    """An error raised inside Ray whose own type cannot be pickled; the message names it."""


def note_provider_index(exc: BaseException, idx: int) -> BaseException:
    """Add a note naming the provider index whose read raised ``exc``; return ``exc``.

    The provider's own error (its type, message and traceback) is what the user must
    see; the note adds which index it was, which a provider's message often omits.
    Notes pickle with the exception, so the index reaches a DataLoader's parent too.

    Parameters
    ----------
    exc : BaseException
        The error the provider raised.
    idx : int
        The index being read.

    Returns
    -------
    BaseException
        ``exc``, with the note added once.
    """
    note = f"raised by the provider reading index {idx}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return exc


def _round_trips(exc: BaseException) -> bool:
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return type(back) is type(exc)


def plain_error(exc: BaseException, what: str | None = None) -> BaseException:
    """Return an exception that pickles, of the original type where possible.

    Parameters
    ----------
    exc : BaseException
        Any exception; usually one raised by ``ray.get``.
    what : str, optional
        What was being done (``"attaching to cache 'x'"``); added to converted errors.

    Returns
    -------
    BaseException
        - for a ``RayTaskError`` (the error raised inside an actor or task): the original
          exception, e.g. ``CacheMismatchError``, with a note saying where it was raised;
        - for a ``RayActorError`` (the actor died or is unreachable):
          ``CacheUnavailableError`` naming the cause;
        - for any other exception that pickles: ``exc`` itself;
        - otherwise ``RemoteError`` whose message names the original type and message.
        The result is never a class Ray built at run time.
    """
    where = f" while {what}" if what else ""
    if isinstance(exc, RayTaskError):
        # Ray's dual class forwards unknown attributes to the cause: read with defaults.
        function = getattr(exc, "function_name", None)
        pid = getattr(exc, "pid", None)
        origin = "".join([f" by {function}" if function else "", f" (pid {pid})" if pid else ""])
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and not isinstance(cause, RayTaskError):
            inner = plain_error(cause, what)
            if inner is cause:
                note = f"raised inside Ray{origin}{where}"
                if note not in getattr(cause, "__notes__", ()):
                    cause.add_note(note)
            return inner
        return RemoteError(f"error inside Ray{where} in {function}: {str(exc).strip()[-2000:]}")
    if isinstance(exc, RayActorError) and not isinstance(exc, CacheUnavailableError):
        return CacheUnavailableError(
            f"the cache's directory actor is gone or unreachable{where} "
            f"({type(exc).__name__}: {str(exc).strip()[:500]}); the cache was dropped or "
            "its Ray cluster stopped: attach again to make a new one"
        )
    if _round_trips(exc):
        return exc
    return RemoteError(f"{type(exc).__qualname__}{where}: {exc}")


@contextlib.contextmanager
def ray_errors_as_plain(what: str | None = None) -> Iterator[None]:
    """Re-raise errors from Ray calls in the block as :func:`plain_error` turns them.

    Parameters
    ----------
    what : str, optional
        What the block does, for the message (``"attaching to cache 'x'"``).

    Yields
    ------
    None
        Run the Ray calls in the block.
    """
    try:
        yield
    except Exception as exc:
        plain = plain_error(exc, what)
        if plain is exc:
            raise
        # The Ray error stays the __cause__ for a local traceback; pickling an exception
        # keeps its args and __dict__, not its __cause__, so the plain one travels.
        raise plain from exc
