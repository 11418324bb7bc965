"""Carry the inserts of forked DataLoader workers to the parent process, which can call Ray.

Ray is not fork-safe: a forked child that makes a Ray call can kill the node's raylet
(``docs/design.md``), so a forked DataLoader worker reads its misses from the
provider but cannot insert them. Without help, a trainer that uses the default start
method and no preload never fills its cache.

The parent opens one pipe per cache client just before each fork. After the fork the
child keeps the write end and the parent the read end; the child writes each item it
read (length-prefixed pickle), and one thread in the parent reads every child's pipe and
hands the items to the client, which buffers and sends them as its own inserts. A pipe
has one writer, so messages never interleave; a child that dies mid-message leaves a
truncated message, which the parent drops with the pipe.

The children map no chunk stored after they were forked (they make no Ray call to learn
of new chunks); they ask their parent for such items instead (``raycache.client.fork_reads``),
and a DataLoader's workers forked for the next epoch map them.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import struct
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["InsertRelay"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
_POLL_S = 0.5  # how often the reader thread checks whether it should stop


class InsertRelay:
    """Pipes from forked children to this process, and the thread that reads them.

    Parameters
    ----------
    deliver : Callable[[int, Any], None]
        Called in the parent, from the relay's thread, with each item a child sent.
    name : str
        Cache name, for log messages.
    on_exit : Callable[[int], None], optional
        Called in the parent with a child's key (see ``after_fork_in_parent``) once its
        pipe is closed: the child has exited, or the relay was closed.
    """

    def __init__(
        self,
        deliver: Callable[[int, Any], None],
        name: str,
        on_exit: Callable[[int], None] | None = None,
    ):
        self._deliver = deliver
        self._on_exit = on_exit
        self._name = name
        self._owner = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._buffers: dict[int, bytearray] = {}
        self._lock = threading.Lock()
        self._next: tuple[int, int] | None = None  # (read fd, write fd) for the next fork
        self._write_fd: int | None = None  # in a child: where its items go
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="raycache-relay", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ fork hooks
    def before_fork(self) -> None:
        """Open the pipe of the child about to be forked (parent side)."""
        if os.getpid() != self._owner or self._stop.is_set():
            return
        self._discard_next()  # left over from a fork that failed
        self._next = os.pipe()

    def after_fork_in_parent(self) -> int | None:
        """Keep the read end of the new child's pipe and start reading it.

        Returns
        -------
        int or None
            The child's key (passed to ``on_exit`` when its pipe closes), or None if the
            fork was not prepared by ``before_fork``.
        """
        if self._next is None:
            return None
        read_fd, write_fd = self._next
        self._next = None
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        with self._lock:
            self._buffers[read_fd] = bytearray()
            self._selector.register(read_fd, selectors.EVENT_READ)
        return read_fd

    def after_fork_in_child(self) -> None:
        """Keep the write end of this child's pipe; drop everything of the parent's."""
        pipe, self._next = self._next, None
        if self._write_fd is not None or pipe is None:
            # A child of a child (its writes could interleave with its parent's), or a
            # fork the parent did not prepare: no relay here.
            self._close_quietly(pipe[1] if pipe is not None else None)
            self._write_fd = None
        else:
            os.close(pipe[0])
            self._write_fd = pipe[1]
        # The parent's read ends and selector: closed here only, never unregistered (the
        # selector's epoll instance is shared with the parent). Its thread is not here.
        for fd in list(self._buffers):
            self._close_quietly(fd)
        self._buffers = {}
        self._lock = threading.Lock()  # the parent's thread may have held it at the fork
        self._stop.set()
        try:
            self._selector.close()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ child side
    def send(self, idx: int, item: Any) -> bool:
        """Send one item to the parent (child side); False if it could not be sent."""
        fd = self._write_fd
        if fd is None:
            return False
        payload = pickle.dumps((int(idx), item), protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as exc:  # the parent is gone or closed the pipe
            logger.warning(
                "raycache %s: cannot send inserts to the parent process (%s); misses in "
                "this worker are no longer cached",
                self._name,
                exc,
            )
            self._close_quietly(fd)
            self._write_fd = None
            return False
        return True

    # ------------------------------------------------------------------ parent side
    def close(self) -> None:
        """Stop reading and close every pipe (parent side)."""
        self._stop.set()
        if os.getpid() == self._owner and self._thread.is_alive():
            self._thread.join(timeout=2 * _POLL_S + 1)
        self._discard_next()
        with self._lock:
            for fd in list(self._buffers):
                self._forget(fd)

    def _pump(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                empty = not self._buffers
            if empty:
                self._stop.wait(_POLL_S)
                continue
            try:
                events = self._selector.select(timeout=_POLL_S)
            except (OSError, ValueError):  # a pipe closed under us; look again
                continue
            for key, _ in events:
                self._read(key.fd)

    def drain(self) -> None:
        """Read and deliver everything the children have written so far (parent side).

        A child's write has returned before its batch reached this process, so after a
        DataLoader epoch every item its workers read is here once this returns.
        """
        if os.getpid() != self._owner:
            return
        while any([self._read(fd) for fd in list(self._buffers)]):
            pass

    def _read(self, fd: int) -> bool:
        """Read what one pipe holds and deliver the complete messages; True if any bytes."""
        with self._lock:  # one reader at a time per pipe keeps the bytes in order
            buffer = self._buffers.get(fd)
            if buffer is None:
                return False
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            if not data:  # the child exited: drop a message it did not finish
                if buffer:
                    logger.warning(
                        "raycache %s: a DataLoader worker exited while sending an item; "
                        "that item is not cached",
                        self._name,
                    )
                self._forget(fd)
                return False
            buffer += data
            messages = []
            while len(buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer)
                if len(buffer) < _HEADER.size + size:
                    break
                messages.append(bytes(buffer[_HEADER.size : _HEADER.size + size]))
                del buffer[: _HEADER.size + size]
        for message in messages:
            idx, item = pickle.loads(message)
            try:
                self._deliver(idx, item)
            except Exception:  # one bad item must not stop the relay
                logger.exception(
                    "raycache %s: could not cache item %s from a worker", self._name, idx
                )
        return True

    def _forget(self, fd: int) -> None:
        if self._buffers.pop(fd, None) is None:
            return
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        if self._on_exit is not None:
            self._on_exit(fd)  # before the fd is closed, and so before it can be reused
        self._close_quietly(fd)

    def _discard_next(self) -> None:
        pipe, self._next = self._next, None
        if pipe is not None:
            for fd in pipe:
                self._close_quietly(fd)

    @staticmethod
    def _close_quietly(fd: int | None) -> None:
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError:
            pass
