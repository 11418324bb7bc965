"""Questions from forked children to the parent process they were forked from.

Ray is not fork-safe: a forked DataLoader worker must make no Ray call
(``raycache.runtime``). It can read the chunks its parent had mapped when it was
forked, but learns of nothing stored after that, and cannot wait for a preload unit
or reserve an index. Its parent, connected to Ray, can: so the child asks it.

The parent opens a socket pair just before each fork (only while some handler is
registered); the child keeps one end and sends length-prefixed pickles
``(token, op, args)``; a thread in the parent reads every child's socket and answers
each request on a thread pool, so that one child waiting for a preload unit does not
hold up another's question. A child asks one question at a time. A child that exits
closes its end: the parent drops it and tells every handler that has a
``child_gone(child)`` method, so that what it holds for that child (reservations) is
given back.

Guarantees: every question has a reply timeout; a child whose question fails (the
parent closed its end, did not answer in time, or the reply was cut) gets
``ChildLinkError`` and its link is closed for good, so a late reply can never be read
as the answer to a later question.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import socket
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "REPLY_TIMEOUT_S",
    "ChildLinkError",
    "ask_parent",
    "child_link",
    "register",
    "stop_serving",
]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
# Default bound on one reply; callers whose parent-side work has a known bound pass
# their own (see ``raycache.client.fork_reads``).
REPLY_TIMEOUT_S = 120.0
_POOL_THREADS = 16  # parent threads answering; a question may wait seconds for a unit


class ChildLinkError(RuntimeError):
    """A forked child's question to its parent failed (parent gone, or its handler raised)."""


def _send(sock: socket.socket, payload: Any) -> None:
    body = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _recv(sock: socket.socket) -> Any:
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        raise EOFError("the other end closed the socket")
    body = _recv_exact(sock, _HEADER.unpack(header)[0])
    if body is None:
        raise EOFError("the other end closed the socket mid-message")
    return pickle.loads(body)


class _ParentServer:
    """The parent's side: one socket per live forked child, answered on a thread pool."""

    def __init__(self) -> None:
        self.handlers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._selector = selectors.DefaultSelector()
        self._socks: dict[socket.socket, threading.Lock] = {}
        self._keys: dict[socket.socket, int] = {}  # the child key handlers see
        self._next_key = 0
        self._pending: tuple[socket.socket, socket.socket] | None = None
        self._pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="raycache-fork-asks")
        self._thread = threading.Thread(
            target=self._serve, name="raycache-fork-server", daemon=True
        )
        self._thread.start()

    @property
    def forking(self) -> bool:
        """True between ``before_fork`` and the end of the fork."""
        return self._pending is not None

    def before_fork(self) -> None:
        self._pending = socket.socketpair()

    def after_in_parent(self) -> None:
        mine, theirs = self._pending
        self._pending = None
        theirs.close()
        self._next_key += 1
        self._keys[mine] = self._next_key
        self._socks[mine] = threading.Lock()
        self._selector.register(mine, selectors.EVENT_READ)

    def in_child(self) -> socket.socket:
        mine, theirs = self._pending
        mine.close()
        for sock in list(self._socks):  # other children's sockets: not this child's
            sock.close()
        return theirs

    def _serve(self) -> None:
        while True:
            try:
                events = self._selector.select(timeout=0.5)
            except (OSError, ValueError):  # a socket closed under us; look again
                continue
            for key, _ in events:
                sock = key.fileobj
                try:
                    request = _recv(sock)
                except (EOFError, OSError, pickle.UnpicklingError):
                    self.drop(sock)
                    continue
                if self._quick(request):  # two thread hops fewer than the pool
                    self._answer(sock, request)
                elif not self._submit(self._answer, sock, request):
                    self.drop(sock)  # the process is exiting: the child falls back

    def _quick(self, request: Any) -> bool:
        """Return True for a question its handler answers without waiting (see ``register``)."""
        try:
            token, op, args = request
            quick = getattr(self.handlers.get(token), "quick", None)
            return bool(quick is not None and quick(op, *args))
        except Exception:  # a malformed request: the pool answers it with the error
            return False

    def drop(self, sock: socket.socket) -> None:
        """Forget one child's socket and tell the handlers the child is gone."""
        if self._socks.pop(sock, None) is None:
            return
        child = self._keys.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        for handler in list(self.handlers.values()):
            gone = getattr(handler, "child_gone", None)
            if gone is not None and child is not None:
                # On the pool: giving back what a child held may call the actor. While
                # the process exits (persistent workers closing at interpreter shutdown)
                # nothing is given back: the actor's leases expire instead.
                self._submit(_quietly, gone, child)

    def _submit(self, call: Any, *args: Any) -> bool:
        """Run ``call(*args)`` on the pool; False once the interpreter is shutting down."""
        try:
            self._pool.submit(call, *args)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            return False
        return True

    def drop_all(self) -> None:
        """Close every child's socket: their next questions fail and they fall back."""
        for sock in list(self._socks):
            self.drop(sock)

    def _answer(self, sock: socket.socket, request: tuple) -> None:
        token, op, args = request
        handler = self.handlers.get(token)
        try:
            if handler is None:
                raise LookupError(f"no cache with token {token} in the parent process")
            answer_for = getattr(handler, "answer_for", None)
            if answer_for is not None:  # handlers that keep state per child
                value = answer_for(self._keys.get(sock, 0), op, *args)
            else:
                value = handler.answer(op, *args)
            reply = (True, value)
        except Exception as exc:  # sent to the child, which raises it there
            logger.exception("raycache: answering a forked worker's %s failed", op)
            reply = (False, f"{type(exc).__name__}: {exc}")
        lock = self._socks.get(sock)
        if lock is None:
            return  # the child is gone
        with lock:
            try:
                _send(sock, reply)
            except OSError:
                logger.warning("raycache: a forked worker left before its answer was sent")


def _quietly(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except Exception:  # on a pool thread: logged, never lost
        logger.exception("raycache: cleaning up after a forked worker failed")


_server: _ParentServer | None = None
_link: socket.socket | None = None
_link_broken = False  # a question failed: the link is closed, and stays so
_link_lock = threading.Lock()


def register(handler: Any) -> int:
    """Answer forked children's questions for ``handler``.

    Call in a process connected to Ray, before it forks. The handler is held weakly.
    It has ``answer(op, *args)``, or ``answer_for(child, op, *args)`` where it keeps
    state per child (``child`` is an int key, the same for every question of one
    child); optionally ``child_gone(child)``, called once the child's socket closed; and
    optionally ``quick(op, *args)``, True for a question answered without waiting (no
    blocking call beyond a bounded, rate-limited one), which the thread reading the
    sockets answers itself instead of handing it to the pool.

    Parameters
    ----------
    handler : Any
        The handler.

    Returns
    -------
    int
        The token a child sends with its questions for this handler.
    """
    global _server
    if _server is None:
        _server = _ParentServer()
    token = id(handler)
    _server.handlers[token] = handler
    return token


def child_link() -> socket.socket | None:
    """Return this forked child's socket to its parent, or None (not such a child).

    A link whose question failed is still returned (closed): the process is still a
    forked child, which must make no Ray call; ``ask_parent`` raises there.
    """
    return _link


def stop_serving() -> None:
    """Close the sockets of every child forked so far (parent side).

    Their next questions raise ``ChildLinkError`` and they read what they miss from
    their provider. Children forked later get new sockets.
    """
    if _server is not None:
        _server.drop_all()


def ask_parent(token: int, op: str, *args: Any, timeout: float = REPLY_TIMEOUT_S) -> Any:
    """Ask the parent's handler ``token`` to run ``op(*args)``; its answer.

    Parameters
    ----------
    token : int
        From ``register`` in the parent.
    op : str
        The handler's operation.
    *args : Any
        Its arguments (picklable).
    timeout : float
        Seconds to wait for the reply; past it the link is closed for good.

    Returns
    -------
    Any
        The handler's return value.

    Raises
    ------
    ChildLinkError
        If this process has no parent link, the parent did not answer within
        ``timeout``, or the handler raised (its message is kept).
    """
    global _link_broken
    with _link_lock:
        sock = _link
        if sock is None or _link_broken:
            raise ChildLinkError(
                "this process has no link to a parent serving a cache (not forked from "
                "one, or the link failed earlier)"
            )
        try:
            sock.settimeout(timeout)
            _send(sock, (token, op, args))
            ok, value = _recv(sock)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            # A reply may still come: the socket is out of step, so it is not used again.
            _link_broken = True
            sock.close()
            raise ChildLinkError(f"the parent process did not answer {op}: {exc!r}") from exc
    if not ok:
        raise ChildLinkError(f"the parent process failed to {op}: {value}")
    return value


def _before() -> None:
    if _server is not None and len(_server.handlers):
        _server.before_fork()


def _after_in_parent() -> None:
    if _server is not None and _server.forking:
        _server.after_in_parent()


def _after_in_child() -> None:
    global _server, _link, _link_broken
    server, _server = _server, None
    if server is not None and server.forking:
        _link, _link_broken = server.in_child(), False
    elif _link is not None:
        _link_broken = True  # a grandchild: its parent's link is not its own


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
