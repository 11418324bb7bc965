"""Building a chunk row by row, while its items are still being read.

``Chunk.from_rows`` needs every item of a chunk at once and then stacks each array
field with one copy. In a preload task that copy ran on one thread after the unit's
last read, holding the GIL for ~50-200 ms per 1,000 items of 48 KiB while the task's
reader threads waited for it between their reads. Here each reader copies the item it
has just read into its row of the chunk's columns (numpy copies large rows without the
GIL), the item is freed at once, and finishing the chunk costs no copy.

The first item added fixes the layout: its structure (dict keys, list lengths) and,
for every numpy-array or tensor leaf, dtype and shape. Items that match are copied
into preallocated ``(capacity, *shape)`` columns; other leaves (numbers, strings,
``None``) are kept per row and encoded when the chunk is built, as ``from_rows``
does. An item that does not match (another structure, a ragged array) is kept whole,
and the chunk is then built by ``from_rows`` instead, so the result is always the
chunk ``from_rows`` would make of the same items.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from raycache.chunk import Chunk, build_item, flatten_item, leaves_nbytes
from raycache.columns import StackedColumn, make_column
from raycache.values import IMMUTABLE_LEAVES, copy_item, loaded_torch

__all__ = ["ChunkBuilder", "ColumnSpares", "release_heap"]


def release_heap() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    glibc keeps freed memory resident in its arenas (and raises its mmap threshold
    after large frees, so later large buffers come from the heap too): a process that
    has stopped copying items still holds what it used while it did.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _as_array(value: Any) -> tuple[np.ndarray, bool] | None:
    """Return ``(numpy view, is_tensor)`` for an array leaf, None for other leaves."""
    if isinstance(value, np.ndarray):
        return value, False
    torch = loaded_torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().numpy(), True
    return None


class ColumnSpares:
    """Column arrays of chunks already sent, handed to the next chunks of a task.

    Touching fresh memory costs a page fault per 4 KiB page, and in a process whose
    threads fault at once the faults wait for each other: reading 2,048 items of
    48 KiB with 4 threads into new columns took 1.37-1.48 s, into columns already
    touched 1.15 s (2 ms of sleep per read). A preload task sends each chunk before
    its buffers are needed again (Ray copies what a task yields into the object
    store), so a couple of spares per column shape serve a whole run.

    Parameters
    ----------
    keep : int
        Spares kept per dtype and row shape (a task fills one unit while it sends
        the one before).
    """

    def __init__(self, keep: int = 2):
        self.keep = int(keep)
        self._lock = threading.Lock()
        self._free: dict[tuple, list[np.ndarray]] = {}

    def take(self, dtype: np.dtype, shape: tuple, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(column, buffer)``: ``rows`` rows of ``shape`` and what they view.

        Parameters
        ----------
        dtype : np.dtype
            The column's dtype.
        shape : tuple
            The shape of one row.
        rows : int
            Rows needed.

        Returns
        -------
        tuple of np.ndarray
            The column (a view of the first ``rows`` rows of a spare with room for
            them, else of a new array) and the buffer to give back once it is sent.
        """
        key = (np.dtype(dtype), tuple(shape))
        with self._lock:
            free = self._free.get(key, [])
            for k, buffer in enumerate(free):
                if len(buffer) >= rows:
                    del free[k]
                    return buffer[:rows], buffer
        buffer = self.new_buffer(key[0], key[1], rows)
        return buffer, buffer

    def new_buffer(self, dtype: np.dtype, shape: tuple, rows: int) -> np.ndarray:
        """Return a new, uninitialised ``(rows, *shape)`` buffer (heap memory here).

        Parameters
        ----------
        dtype : np.dtype
            Its dtype.
        shape : tuple
            The shape of one row.
        rows : int
            Rows.

        Returns
        -------
        np.ndarray
            The buffer.
        """
        return np.empty((rows, *shape), dtype=dtype)

    def give(self, buffers: list[np.ndarray]) -> None:
        """Take back buffers whose chunk has been sent; keep the largest few.

        Parameters
        ----------
        buffers : list of np.ndarray
            Buffers from ``take`` that nothing reads any more.
        """
        with self._lock:
            for buffer in buffers:
                key = (buffer.dtype, buffer.shape[1:])
                free = self._free.setdefault(key, [])
                free.append(buffer)
                free.sort(key=len, reverse=True)
                del free[self.keep :]

    def __bool__(self) -> bool:
        """Return True while it holds a spare."""
        with self._lock:
            return any(self._free.values())

    def buffers(self) -> list[np.ndarray]:
        """Return the spares held now (for checks that they are freed)."""
        with self._lock:
            return [b for free in self._free.values() for b in free]

    def clear(self) -> None:
        """Drop every spare."""
        with self._lock:
            self._free.clear()

    def release(self) -> None:
        """Drop every spare and return the freed memory to the OS (``release_heap``)."""
        self.clear()
        release_heap()


class ChunkBuilder:
    """Collects up to ``capacity`` items, by row position, into one chunk's columns.

    ``add`` may be called from several threads at once for distinct positions.

    Parameters
    ----------
    capacity : int
        Rows the chunk may hold (positions ``0..capacity-1``).
    spares : ColumnSpares, optional
        Where the array columns come from; once the chunk has been sent, give
        ``buffers`` back to it.
    private : bool
        Keep a private copy of an item that does not fit the layout (its owner may
        change it later), rather than the item itself.
    """

    def __init__(self, capacity: int, spares: ColumnSpares | None = None, private: bool = False):
        self.capacity = int(capacity)
        self.spares = spares
        self.private = private
        self.buffers: list[np.ndarray] = []  # what the columns view, for ``spares.give``
        self._lock = threading.Lock()
        self._template: Any = None
        # Per leaf: (dtype, shape, is_tensor, column) for an array leaf, None otherwise.
        self._slots: list | None = None
        self._others: dict[int, list] = {}  # row -> its non-array leaves
        self._whole: dict[int, Any] = {}  # position -> item that does not fit the layout

    def _plan(self, template: Any, leaves: list) -> None:
        """Fix the layout from the first item and allocate its array columns."""
        slots = []
        for leaf in leaves:
            found = _as_array(leaf)
            if found is None:
                slots.append(None)
                continue
            array, tensor = found
            if self.spares is None:
                column = np.empty((self.capacity, *array.shape), dtype=array.dtype)
            else:
                column, buffer = self.spares.take(array.dtype, array.shape, self.capacity)
                self.buffers.append(buffer)
            slots.append((array.dtype, array.shape, tensor, column))
        self._template = template
        self._slots = slots

    def add(self, pos: int, item: Any, flat: tuple | None = None) -> int:
        """Copy a validated item (see ``values.check_item``) into row ``pos``.

        Parameters
        ----------
        pos : int
            Its row, ``0 <= pos < capacity``; each position is added at most once.
        item : Any
            The item; the builder keeps no reference to its arrays.
        flat : tuple, optional
            ``(template, leaves)`` of the item (see ``chunk.flatten_item``), where the
            caller has them already.

        Returns
        -------
        int
            Its size (see ``chunk.leaves_nbytes``).
        """
        if flat is None:
            leaves: list = []
            template = flatten_item(item, leaves)
        else:
            template, leaves = flat
        nbytes = leaves_nbytes(leaves)
        if self._slots is None:
            with self._lock:
                if self._slots is None:
                    self._plan(template, leaves)
        arrays = self._matching_arrays(template, leaves) if template == self._template else None
        if arrays is None:
            self._whole[pos] = copy_item(item) if self.private else item
            return nbytes
        others = []
        for leaf, slot, array in zip(leaves, self._slots, arrays):
            if slot is None:
                others.append(leaf)
            else:
                slot[3][pos] = array
        self._others[pos] = others
        return nbytes

    def add_rows(self, pos: int, items: list, flats: list) -> int:
        """Copy validated items of one layout into rows ``pos, pos + 1, ...``.

        The items share the first one's template, leaf types, and array dtypes and
        shapes (see ``client.batch_put.flatten_batch``): each array field is copied
        with one ``np.stack`` into its column. Items that do not fit the chunk's
        layout are added one by one, as ``add`` does.

        Parameters
        ----------
        pos : int
            The first item's row; each row is added at most once.
        items : list
            The items.
        flats : list
            Each item's ``(template, leaves)``.

        Returns
        -------
        int
            Their size (see ``chunk.leaves_nbytes``).
        """
        template, first = flats[0]
        if self._slots is None:
            with self._lock:
                if self._slots is None:
                    self._plan(template, first)
        fits = template == self._template and self._matching_arrays(template, first) is not None
        if not fits:
            pairs = enumerate(zip(items, flats))
            return sum(self.add(pos + k, item, flat) for k, (item, flat) in pairs)
        count = len(flats)
        kept = []  # positions of the leaves kept per row
        for j, slot in enumerate(self._slots):
            if slot is None:
                kept.append(j)
                continue
            rows = [flat[1][j] for flat in flats]
            if slot[2]:
                rows = [row.detach().numpy() for row in rows]
            np.stack(rows, out=slot[3][pos : pos + count])
        for k, (_, leaves) in enumerate(flats):
            self._others[pos + k] = [leaves[j] for j in kept]
        return leaves_nbytes(first) * count

    def _matching_arrays(self, template: Any, leaves: list) -> list | None:
        """Return each leaf's array (None for other leaves), or None if it does not fit.

        A leaf that is neither an array nor an immutable value (a namedtuple, say)
        does not fit either: the builder keeps other leaves by reference.
        """
        arrays = []
        for leaf, slot in zip(leaves, self._slots):
            if slot is None:
                if not isinstance(leaf, IMMUTABLE_LEAVES):
                    return None
                arrays.append(None)
                continue
            found = _as_array(leaf)
            if found is None:
                return None
            array, tensor = found
            if tensor != slot[2] or array.dtype != slot[0] or array.shape != slot[1]:
                return None
            arrays.append(array)
        return arrays

    def build(self, indices: np.ndarray, positions: np.ndarray) -> Chunk:
        """Return the chunk of the rows at ``positions``, in that order.

        Parameters
        ----------
        indices : np.ndarray
            The provider index of each kept row.
        positions : np.ndarray
            Row positions that were added (rows whose read failed are left out).

        Returns
        -------
        Chunk
            Equal to ``Chunk.from_rows`` of the same items.
        """
        indices = np.asarray(indices, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions):
            return Chunk.from_rows([], [])
        kept = positions.tolist()
        if any(p in self._whole for p in kept):
            return Chunk.from_rows(indices, [self.row(p) for p in kept])
        # The first rows, in order (every row of a full unit, a partly filled buffer):
        # the columns are used as they are; any other selection is copied out.
        prefix = np.array_equal(positions, np.arange(len(kept)))
        columns = []
        k = 0
        for slot in self._slots:
            if slot is None:
                columns.append(make_column([self._others[p][k] for p in kept]))
                k += 1
            else:
                column = slot[3][: len(kept)] if prefix else slot[3][positions]
                columns.append(StackedColumn(column, slot[2]))
        return Chunk(indices, self._template, columns)

    def row(self, pos: int) -> Any:
        """Return the item added at ``pos``; its arrays are views of the columns.

        Parameters
        ----------
        pos : int
            A position that was added.

        Returns
        -------
        Any
            The item (copy it before handing it to code that may keep or change it).
        """
        if pos in self._whole:
            return self._whole[pos]
        others = iter(self._others[pos])
        leaves = []
        for slot in self._slots:
            if slot is None:
                leaves.append(next(others))
                continue
            row = slot[3][pos, ...]  # `...` keeps a 0-d row an array
            if slot[2]:
                import torch  # the slot holds tensors, so torch is imported already

                row = torch.from_numpy(row)
            leaves.append(row)
        return build_item(self._template, iter(leaves))
