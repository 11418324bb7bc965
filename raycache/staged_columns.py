"""Columns handed to the directory actor by reference to a trainer's shared memory.

A trainer filling the cache on miss used to send each chunk of inserts as an actor
call argument: Ray copied it into the object store as a temporary object owned by the
trainer, and the actor then stored its own copy (an object owned by a trainer dies with
it). Two writes per byte, the temporary one in the trainer's process (Ray's copy there
competes with the trainer for its cores), and store pages that stay resident after the
temporary object is freed (docs/memory.md).

On the actor's node a trainer instead copies its inserts into column buffers in
anonymous shared memory (``memfd_create``, ``raycache.client.staging``) and sends only
where they are: its pid, the file descriptor, the file's device and inode, the offset,
dtype and shape (``StagedArray``). The actor opens the same memory through
``/proc/<pid>/fd/<fd>`` and stores the chunk with one copy (``open_staged``). The
device and inode checks make sure the descriptor still names the trainer's buffer. The
trainer reuses a buffer only after the actor has answered the call that named it.

Guarantees: a staged array is read only where the trainer's node is the actor's node
and the file opened is the one named; otherwise ``StagingUnavailable`` is raised and
nothing is stored, and the trainer sends the same chunk the usual way.
"""

from __future__ import annotations

import mmap
import os
from typing import NamedTuple

import numpy as np

from raycache.chunk import Chunk
from raycache.columns import StackedColumn

__all__ = ["StagedArray", "StagingUnavailable", "open_staged", "staging_supported"]


class StagingUnavailable(Exception):
    """A staged array could not be opened here (another node, a closed buffer, no access)."""


class StagedArray(NamedTuple):
    """Where a column's array lies in a trainer's shared memory.

    Attributes
    ----------
    fd : int
        The trainer's file descriptor of the memory.
    device : int
        The memory file's device.
    inode : int
        The memory file's inode: with ``device``, what makes sure the descriptor still
        names the buffer (a descriptor number is reused once closed, and another pid
        namespace may see another process under the same pid).
    offset : int
        Byte offset of the array in the file.
    dtype : numpy.dtype
        The array's dtype (the object: a structured dtype's fields survive).
    shape : tuple
        The array's shape.
    """

    fd: int
    device: int
    inode: int
    offset: int
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        """Bytes of the array."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def staging_supported() -> bool:
    """Return True where anonymous shared memory can be made (``os.memfd_create``).

    Returns
    -------
    bool
        True on Linux.
    """
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _map_file(pid: int, fd: int, file_id: tuple[int, int]) -> mmap.mmap:
    """Map the trainer's file ``fd`` read-only, checking it is the file named."""
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StagingUnavailable(f"cannot open fd {fd} of process {pid}: {exc}") from exc
    try:
        info = os.fstat(own)
        if (info.st_dev, info.st_ino) != file_id:
            raise StagingUnavailable(f"fd {fd} of process {pid} is no longer the buffer named")
        try:
            return mmap.mmap(own, info.st_size, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise StagingUnavailable(f"cannot map fd {fd} of process {pid}: {exc}") from exc
    finally:
        os.close(own)


def open_staged(chunks: list[Chunk], pid: int) -> list[Chunk]:
    """Return ``chunks`` with each staged column's array mapped from process ``pid``.

    Parameters
    ----------
    chunks : list of Chunk
        Chunks whose ``StackedColumn`` arrays may be ``StagedArray`` references.
    pid : int
        The trainer's process id (on this node).

    Returns
    -------
    list of Chunk
        The chunks over read-only views of the trainer's memory; the views keep the
        mappings alive, and nothing else does.

    Raises
    ------
    StagingUnavailable
        If a staged array cannot be opened or does not fit its file.
    """
    files: dict[tuple[int, int, int], mmap.mmap] = {}
    opened = []
    for chunk in chunks:
        columns = []
        for column in chunk.columns:
            data = getattr(column, "data", None)
            if isinstance(column, StackedColumn) and isinstance(data, StagedArray):
                key = (data.fd, data.device, data.inode)
                if key not in files:
                    files[key] = _map_file(pid, data.fd, key[1:])
                column = StackedColumn(_view(files[key], data), column.tensor)
            columns.append(column)
        opened.append(Chunk(chunk.indices, chunk.template, columns))
    return opened


def _view(memory: mmap.mmap, staged: StagedArray) -> np.ndarray:
    dtype = np.dtype(staged.dtype)
    count = int(np.prod(staged.shape, dtype=np.int64))
    if staged.offset < 0 or staged.offset + count * dtype.itemsize > len(memory):
        raise StagingUnavailable(f"staged array {staged} does not fit its buffer")
    flat = np.frombuffer(memory, dtype=dtype, count=count, offset=staged.offset)
    return flat.reshape(staged.shape)
