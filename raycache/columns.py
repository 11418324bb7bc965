"""The columns of a chunk: how one leaf position is stored across a chunk's rows.

A chunk stores items of one structure column by column (see ``raycache.chunk``). Each
column keeps one leaf position of every row in the layout that makes reading a row
cheap and gathering a batch one vectorised copy: same-shaped arrays stacked into one
``(n, *shape)`` array, arrays of differing shapes in one flat buffer with offsets,
numbers of one type (Python's or numpy's) in one numpy array, anything else as a list.
Every column answers ``row``, ``take`` and ``nbytes``.

A large array travels to the object store in pieces of at most ``PIECE_BYTES``
(``__reduce_ex__``, pickle protocol 5): Ray copies a buffer over 1 MiB with several
threads at once, which on a node whose cores the trainers hold slows both the copy and
everything beside it (one 64 MiB column: 37 ms a put, and a trainer's batch copies
meanwhile at 0.45x their speed on 2 cores; as 1 MiB pieces, 33 ms and 0.91x). Ray lays
the pieces out back to back, so a reader joins them into one array over the stored
bytes without a copy (``join_pieces``); pieces that do not lie back to back (a plain
``pickle`` round trip) are concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raycache.values import IMMUTABLE_LEAVES, loaded_torch, rebuilt

__all__ = [
    "PIECE_BYTES",
    "NumberColumn",
    "ObjectColumn",
    "RaggedColumn",
    "StackedColumn",
    "copy_leaves",
    "join_pieces",
    "make_column",
    "same_dtype",
    "split_pieces",
]


# At most Ray's single-threaded copy size (1 MiB), and a multiple of the 64-byte
# alignment Ray gives each buffer, so that consecutive pieces leave no gap.
PIECE_BYTES = 1 << 20


def split_pieces(array: np.ndarray) -> list[np.ndarray] | None:
    """Return ``array``'s bytes as views of at most ``PIECE_BYTES``, or None to keep it whole.

    Parameters
    ----------
    array : numpy.ndarray
        A column's array.

    Returns
    -------
    list of numpy.ndarray or None
        Consecutive uint8 views, or None for an array of one piece or not C-contiguous.
    """
    if not isinstance(array, np.ndarray):  # a reference to it (``raycache.staged_columns``)
        return None
    if array.nbytes <= PIECE_BYTES or not array.flags.c_contiguous or array.dtype.hasobject:
        return None
    flat = array.reshape(-1).view(np.uint8)
    return [flat[k : k + PIECE_BYTES] for k in range(0, len(flat), PIECE_BYTES)]


def same_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Return ``array`` in ``dtype``: its byte order, which ``np.stack`` does not keep.

    ``np.stack`` and ``np.concatenate`` of big-endian arrays return native ones; a
    cached item keeps the byte order it had (a copy here, for such arrays only).

    Parameters
    ----------
    array : numpy.ndarray
        A stacked or concatenated array.
    dtype : numpy.dtype
        The dtype of the arrays it was made of.

    Returns
    -------
    numpy.ndarray
        ``array`` itself when it has ``dtype``, else a copy in it.
    """
    return array if array.dtype == dtype else array.astype(dtype)


def join_pieces(pieces: Sequence[np.ndarray], dtype: np.dtype, shape: tuple) -> np.ndarray:
    """Return the array ``split_pieces`` cut, over the pieces' own bytes where they abut.

    Parameters
    ----------
    pieces : Sequence[numpy.ndarray]
        The uint8 pieces, in order.
    dtype : numpy.dtype
        The array's dtype.
    shape : tuple
        The array's shape.

    Returns
    -------
    numpy.ndarray
        A view spanning the pieces (read-only where they are, as in the object store),
        or a new array of their concatenation where they do not lie back to back.
    """
    first = pieces[0]
    start = first.__array_interface__["data"][0]
    at = start
    for piece in pieces:
        if piece.__array_interface__["data"][0] != at:
            return np.concatenate(pieces).view(dtype).reshape(shape)
        at += piece.nbytes
    # One view over bytes that belong to one buffer (the stored object): the first
    # piece's base keeps the whole of it alive. Read-only if the first piece is.
    whole = np.lib.stride_tricks.as_strided(first, shape=(at - start,), strides=(1,))
    return whole.view(dtype).reshape(shape)


def _reduce_in_pieces(column: Any, array: np.ndarray, rest: tuple, protocol: int) -> Any:
    """``column.__reduce_ex__``: ``array`` in pieces under protocol 5, else the default.

    ``column`` is rebuilt as ``type(column)(array, *rest)``.
    """
    pieces = split_pieces(array) if protocol >= 5 else None
    if pieces is None:
        return object.__reduce_ex__(column, protocol)
    return _rebuild, (type(column), pieces, array.dtype, array.shape, *rest)


def _rebuild(cls: type, pieces: list, dtype: np.dtype, shape: tuple, *rest: Any) -> Any:
    return cls(join_pieces(pieces, dtype, shape), *rest)


class StackedColumn:
    """Same dtype and shape in every row: one ``(n, *shape)`` array."""

    def __init__(self, data: np.ndarray, tensor: bool):
        self.data = data
        self.tensor = tensor

    def row(self, r: int, copy: bool) -> Any:
        """Return row ``r``: a copy, or a view that must not be written when not ``copy``."""
        view = self.data[r, ...]  # `...` keeps 0-d rows arrays, not numpy scalars
        if self.tensor:
            import torch  # the chunk holds tensors: rebuilding them needs torch

            return torch.from_numpy(view.copy())
        return view.copy() if copy else view

    def take(self, rows: np.ndarray) -> StackedColumn:
        """Return a column of the rows ``rows``, in that order."""
        return StackedColumn(self.data[rows], self.tensor)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle a large column in pieces under protocol 5 (see the module docstring)."""
        return _reduce_in_pieces(self, self.data, (self.tensor,), protocol)

    @property
    def nbytes(self) -> int:
        """Bytes the column holds."""
        return self.data.nbytes


class RaggedColumn:
    """Same dtype and number of dimensions, shapes differ: one flat buffer and offsets."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, tensor: bool):
        self.flat = flat
        self.offsets = offsets
        self.shapes = shapes
        self.tensor = tensor

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], tensor: bool) -> RaggedColumn:
        """Pack ``arrays`` of any shapes into one flat array with offsets and shapes."""
        sizes = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0)
        if arrays:
            flat = same_dtype(flat, arrays[0].dtype)
        shapes = np.array([a.shape for a in arrays], dtype=np.int64).reshape(len(arrays), -1)
        return cls(flat, offsets, shapes, tensor)

    def _view(self, r: int) -> np.ndarray:
        return self.flat[self.offsets[r] : self.offsets[r + 1]].reshape(tuple(self.shapes[r]))

    def row(self, r: int, copy: bool) -> Any:
        """Return row ``r``: a copy, or a view that must not be written when not ``copy``."""
        view = self._view(r)
        if self.tensor:
            import torch  # the chunk holds tensors: rebuilding them needs torch

            return torch.from_numpy(view.copy())
        return view.copy() if copy else view

    def take(self, rows: np.ndarray) -> RaggedColumn:
        """Return a column of the rows ``rows``, in that order."""
        return RaggedColumn.from_arrays([self._view(int(r)) for r in rows], self.tensor)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle a large column in pieces under protocol 5 (see the module docstring)."""
        rest = (self.offsets, self.shapes, self.tensor)
        return _reduce_in_pieces(self, self.flat, rest, protocol)

    @property
    def nbytes(self) -> int:
        """Bytes the column holds."""
        return self.flat.nbytes + self.offsets.nbytes + self.shapes.nbytes


class NumberColumn:
    """Numbers of one type: one numpy array, converted back to that type on read.

    Python ints, floats and bools (``scalar`` False) come back as Python numbers; numpy
    scalars of one type (``scalar`` True: ``np.int64``, ``np.float32``, ``np.bool_``...,
    as a label read from a numpy array is) come back as numpy scalars of the array's
    dtype, which is theirs.
    """

    scalar = False  # a column pickled without the attribute holds Python numbers

    def __init__(self, data: np.ndarray, scalar: bool = False):
        self.data = data
        self.scalar = scalar

    def row(self, r: int, copy: bool) -> Any:
        """Return row ``r``: a copy, or a view that must not be written when not ``copy``."""
        return self.data[r] if self.scalar else self.data[r].item()

    def take(self, rows: np.ndarray) -> NumberColumn:
        """Return a column of the rows ``rows``, in that order."""
        return NumberColumn(self.data[rows], self.scalar)

    @property
    def nbytes(self) -> int:
        """Bytes the column holds."""
        return self.data.nbytes


class ObjectColumn:
    """Anything else (mixed types, strings, None): one list of values.

    Immutable values are returned as they are; arrays and tensors are copied on
    read unless zero-copy views were asked for.
    """

    def __init__(self, values: list):
        self.values = values

    def row(self, r: int, copy: bool) -> Any:
        """Return row ``r``: a copy, or a view that must not be written when not ``copy``."""
        value = self.values[r]
        if isinstance(value, IMMUTABLE_LEAVES):
            return value
        return copy_leaves(value, copy)

    def take(self, rows: np.ndarray) -> ObjectColumn:
        """Return a column of the rows ``rows``, in that order."""
        return ObjectColumn([self.values[int(r)] for r in rows])

    @property
    def nbytes(self) -> int:
        """Bytes the column holds."""
        from raycache.values import data_size

        return sum(data_size(v) for v in self.values)


def copy_leaves(value: Any, copy: bool) -> Any:
    """Return ``value`` with its arrays and tensors copied (arrays only if ``copy``)."""
    if isinstance(value, np.ndarray):
        return value.copy() if copy else value
    torch = loaded_torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return rebuilt(value, {k: copy_leaves(v, copy) for k, v in value.items()})
    if isinstance(value, (list, tuple)):  # a subclass (a namedtuple) keeps its type
        return rebuilt(value, [copy_leaves(v, copy) for v in value])
    return value


def _is_tensor(value: Any) -> bool:
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.Tensor)


def make_column(values: list) -> Any:
    """Choose the layout for one leaf position across all rows of a chunk."""
    first = values[0]
    if isinstance(first, np.ndarray) or _is_tensor(first):
        tensor = _is_tensor(first)
        arrays = [v.numpy() if _is_tensor(v) else v for v in values]
        kinds_match = all(
            (_is_tensor(v) == tensor) and (isinstance(v, np.ndarray) or _is_tensor(v))
            for v in values
        )
        if kinds_match:
            dtype, shape = arrays[0].dtype, arrays[0].shape
            if all(a.dtype == dtype and a.shape == shape for a in arrays):
                return StackedColumn(same_dtype(np.stack(arrays), dtype), tensor)
            if all(a.dtype == dtype and a.ndim == len(shape) for a in arrays):
                return RaggedColumn.from_arrays(arrays, tensor)
        return ObjectColumn(list(values))
    kind = type(first)
    if kind in (int, float, bool) and all(type(v) is kind for v in values):
        if kind is int:
            try:
                return NumberColumn(np.array(values, dtype=np.int64))
            except OverflowError:
                return ObjectColumn(list(values))
        return NumberColumn(np.array(values, dtype=np.float64 if kind is float else np.bool_))
    if issubclass(kind, (np.number, np.bool_)) and all(type(v) is kind for v in values):
        return NumberColumn(np.array(values, dtype=first.dtype), scalar=True)
    return ObjectColumn(list(values))
