"""A trainer's insert buffers in shared memory the directory actor can read directly.

On the directory actor's node, a process that inserts keeps its column buffers in
anonymous shared memory (``memfd_create``) instead of its heap (``StagedSpares``), and
sends each chunk as references into them (``staged_chunks``); the actor copies them
into the object store once (``raycache.staged_columns``). Elsewhere, or where the
actor cannot open them, chunks are sent as before, as call arguments.

A buffer's descriptor stays open for as long as the buffer lives (the actor opens it
by ``/proc/<pid>/fd/<fd>``) and is closed when the buffer is freed. Buffers are given
back for reuse only once the actor has answered (``WriteBuffer._send_batch``).
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref
from typing import Any

import numpy as np
import ray

from raycache.chunk import Chunk
from raycache.chunk_builder import ColumnSpares
from raycache.columns import StackedColumn
from raycache.staged_columns import StagedArray, staging_supported

__all__ = ["InsertSender", "StagedSpares", "staged_chunks", "this_node"]

logger = logging.getLogger(__name__)


class StagedSpares(ColumnSpares):
    """Column buffers in anonymous shared memory, kept and reused as ``ColumnSpares``.

    Parameters
    ----------
    keep : int
        Spares kept per dtype and row shape.
    """

    def __init__(self, keep: int = 2):
        super().__init__(keep)
        # Buffer start address -> (fd, (device, inode), bytes), for each buffer alive.
        self._files: dict[int, tuple[int, tuple[int, int], int]] = {}

    def new_buffer(self, dtype: np.dtype, shape: tuple, rows: int) -> np.ndarray:
        """As ``ColumnSpares.new_buffer``, in a shared memory file of its own, closed when freed."""
        count = rows * int(np.prod(shape, dtype=np.int64))
        size = max(1, count * np.dtype(dtype).itemsize)
        fd = os.memfd_create("raycache-inserts", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        # Every view of the buffer keeps ``flat`` alive (numpy's base of a view is the
        # array over the mmap): the file is closed once nothing views its memory.
        flat = np.frombuffer(memory, dtype=dtype, count=count)
        start = flat.__array_interface__["data"][0]
        self._files[start] = (fd, (info.st_dev, info.st_ino), size)
        weakref.finalize(flat, _close, self._files, start, fd)
        return flat.reshape((rows, *shape))

    def locate(self, array: np.ndarray) -> StagedArray | None:
        """Return where ``array`` lies in one of these buffers, or None.

        Parameters
        ----------
        array : np.ndarray
            A column's array.

        Returns
        -------
        StagedArray or None
            The reference the actor opens, for a C-contiguous array within a buffer.
        """
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            return None
        at = array.__array_interface__["data"][0]
        for start, (fd, (device, inode), size) in list(self._files.items()):
            if start <= at and at + array.nbytes <= start + size:
                return StagedArray(fd, device, inode, at - start, array.dtype, array.shape)
        return None


def this_node() -> str:
    """Return this process's Ray node id (what the actor compares with its own).

    Returns
    -------
    str
        The node id.
    """
    return ray.get_runtime_context().get_node_id()


def _close(files: dict, start: int, fd: int) -> None:
    """Close a freed buffer's file (called by the buffer's finalizer, in any thread)."""
    files.pop(start, None)
    os.close(fd)


def _described(chunk: Chunk, spares: StagedSpares) -> Chunk | None:
    """Return ``chunk`` with each array in ``spares``' buffers as a ``StagedArray``.

    The chunk shares every other column with ``chunk``; None when no column is staged.
    """
    columns, staged = [], False
    for column in chunk.columns:
        if isinstance(column, StackedColumn):
            where = spares.locate(column.data)
            if where is not None:
                column, staged = StackedColumn(where, column.tensor), True
        columns.append(column)
    return Chunk(chunk.indices, chunk.template, columns) if staged else None


def staged_chunks(chunks: list[Chunk], spares: StagedSpares) -> list[Chunk] | None:
    """Return ``chunks`` with their buffered columns as references, or None if none is.

    Parameters
    ----------
    chunks : list of Chunk
        Chunks built over ``spares``' buffers (``Segment.chunk``).
    spares : StagedSpares
        Where their buffers come from.

    Returns
    -------
    list of Chunk or None
        What to send to the actor's ``insert_staged``; None when no column lies in a
        shared buffer (send ``chunks`` themselves).
    """
    described = [_described(chunk, spares) for chunk in chunks]
    if all(d is None for d in described):
        return None
    return [chunk if d is None else d for chunk, d in zip(chunks, described)]


# Column buffers kept per layout for the next inserts. A trainer filling fast has a
# segment filling and up to three sent while the actor stores the first: keeping two
# freed the others as they came back, and the next segments wrote fresh pages (a fresh
# shared memory page costs 4-8x a page written before: 0.6-1.3 ms/MB against 0.15 ms/MB
# here). 20,000 items of 48 KiB filled on miss wrote 268-402 MB of fresh buffers with
# two kept, 268 MB (the first four) with four. They are freed once inserts stop
# (``client.write_buffer.WRITE_IDLE_S``).
SPARE_BUFFERS = 4


class InsertSender:
    """Sends a process's chunks of inserts to the actor, by reference where it can.

    Parameters
    ----------
    link : ActorLink
        The line to the directory actor.

    Attributes
    ----------
    spares : ColumnSpares
        The column buffers for the next inserts: in shared memory while the actor
        reads them there (``StagedSpares``), else in the heap.
    """

    def __init__(self, link: Any):
        self._link = link
        staged = staging_supported()
        self.spares = StagedSpares(SPARE_BUFFERS) if staged else ColumnSpares(SPARE_BUFFERS)
        self._node_id = this_node()

    @property
    def path(self) -> str:
        """How inserts reach the actor: ``"shared memory"`` or ``"call arguments"``."""
        return "shared memory" if isinstance(self.spares, StagedSpares) else "call arguments"

    def send(self, chunks: list[Chunk], version: int) -> Any:
        """Send ``chunks`` (``insert``, or ``insert_staged`` by reference); the reply.

        The actor reads staged buffers during the call: the caller reuses them only
        after it. At the actor's first refusal (another node, no access to this
        process's memory) the chunks themselves are sent, from then on, and new buffers
        come from the heap.

        Parameters
        ----------
        chunks : list of Chunk
            Chunks built over ``spares``' buffers.
        version : int
            The version of this process's map.

        Returns
        -------
        Any
            The actor's ``InsertResult``, or ``LOST``.
        """
        client_id = self._link.client_id
        spares = self.spares
        staged = staged_chunks(chunks, spares) if isinstance(spares, StagedSpares) else None
        if staged is not None:
            args = (staged, os.getpid(), self._node_id, client_id, version)
            reply = self._link.call("insert_staged", *args)
            if reply is not None:
                return reply
            self.spares = ColumnSpares()
            logger.info("raycache %s: inserts are sent as call arguments", self._link.name)
        return self._link.call("insert", chunks, client_id, version)

    def after_fork_in_child(self) -> None:
        """Keep no buffer of the parent's (a forked child sends nothing itself)."""
        self.spares = ColumnSpares()
