"""Let forked DataLoader workers read and fill the shared cache through their parent.

Hyrax 0.9+ forks its DataLoader workers (``multiprocessing_context="fork"``), and Ray is
not fork-safe: a forked worker must make no Ray call (``raycache.runtime``). It can read
the chunks its parent had mapped when it was forked, but learns of nothing stored after
that, so a persistent worker would read again every item the cache got after its fork,
and two workers would each read an item both miss.

So a forked worker asks its parent: the parent, connected to Ray, answers each question
with the handler the cache registered (``raycache.hyrax.fill.OnceFill`` behind it). The
parent opens a socket pair just before each fork; the child keeps one end and sends
length-prefixed pickles ``(token, op, args)``; a thread in the parent reads every child's
socket and answers each request on a thread pool, so that one child waiting for an item
another child is reading does not hold up the other's insert. A child asks one question
at a time. A child that exits closes its end, and the parent drops it.
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

__all__ = ["ChildLinkError", "ask_parent", "child_link", "register"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
REPLY_TIMEOUT_S = 120.0


class ChildLinkError(RuntimeError):
    """A forked worker's question to its parent failed (parent gone, or its handler raised)."""


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
        self._pending: tuple[socket.socket, socket.socket] | None = None
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="raycache-fork-reads")
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
        self._socks[mine] = threading.Lock()
        self._selector.register(mine, selectors.EVENT_READ)

    def in_child(self) -> socket.socket:
        mine, theirs = self._pending
        mine.close()
        for sock in list(self._socks):  # other children's sockets: not this child's
            sock.close()
        theirs.settimeout(REPLY_TIMEOUT_S)
        return theirs

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                try:
                    request = _recv(sock)
                except (EOFError, OSError):
                    self._drop(sock)
                    continue
                self._pool.submit(self._answer, sock, request)

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        self._socks.pop(sock, None)
        sock.close()

    def _answer(self, sock: socket.socket, request: tuple) -> None:
        token, op, args = request
        handler = self.handlers.get(token)
        try:
            if handler is None:
                raise LookupError(f"no cache with token {token} in the parent process")
            reply = (True, handler.answer(op, *args))
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


_server: _ParentServer | None = None
_link: socket.socket | None = None
_link_lock = threading.Lock()


def register(handler: Any) -> int:
    """Answer forked children's questions for ``handler`` (``handler.answer(op, *args)``).

    Call in a process connected to Ray, before it forks. The handler is held weakly.

    Parameters
    ----------
    handler : Any
        An object with ``answer(op, *args)``.

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
    """Return this forked child's socket to its parent, or None (not such a child)."""
    return _link


def ask_parent(token: int, op: str, *args: Any) -> Any:
    """Ask the parent's handler ``token`` to run ``op(*args)``; its answer.

    Parameters
    ----------
    token : int
        From ``register`` in the parent.
    op : str
        The handler's operation.
    *args : Any
        Its arguments (picklable).

    Returns
    -------
    Any
        The handler's return value.

    Raises
    ------
    ChildLinkError
        If this process has no parent link, the parent did not answer within
        ``REPLY_TIMEOUT_S``, or the handler raised (its message is kept).
    """
    sock = _link
    if sock is None:
        raise ChildLinkError("this process was not forked from a process serving a cache")
    with _link_lock:
        try:
            _send(sock, (token, op, args))
            ok, value = _recv(sock)
        except (OSError, EOFError) as exc:
            raise ChildLinkError(f"the parent process did not answer {op}: {exc}") from exc
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
    global _server, _link
    server, _server = _server, None
    if server is not None and server.forking:
        _link = server.in_child()


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
