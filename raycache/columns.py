"""The columns of a chunk: how one leaf position is stored across a chunk's rows.

A chunk stores items of one structure column by column (see ``raycache.chunk``). Each
column keeps one leaf position of every row in the layout that makes reading a row
cheap and gathering a batch one vectorised copy: same-shaped arrays stacked into one
``(n, *shape)`` array, arrays of differing shapes in one flat buffer with offsets,
numbers in one numpy array, anything else as a list. Every column answers ``row``,
``take`` and ``nbytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raycache.values import IMMUTABLE_LEAVES, loaded_torch

__all__ = [
    "NumberColumn",
    "ObjectColumn",
    "RaggedColumn",
    "StackedColumn",
    "copy_leaves",
    "make_column",
]


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

    @property
    def nbytes(self) -> int:
        """Bytes the column holds."""
        return self.flat.nbytes + self.offsets.nbytes + self.shapes.nbytes


class NumberColumn:
    """Python ints, floats or bools: one numpy array, converted back on read."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def row(self, r: int, copy: bool) -> Any:
        """Return row ``r``: a copy, or a view that must not be written when not ``copy``."""
        return self.data[r].item()

    def take(self, rows: np.ndarray) -> NumberColumn:
        """Return a column of the rows ``rows``, in that order."""
        return NumberColumn(self.data[rows])

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
        return {k: copy_leaves(v, copy) for k, v in value.items()}
    if type(value) is list:
        return [copy_leaves(v, copy) for v in value]
    if isinstance(value, tuple):
        values = [copy_leaves(v, copy) for v in value]
        make = getattr(type(value), "_make", None)  # a namedtuple keeps its type
        return make(values) if make is not None else tuple(values)
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
                return StackedColumn(np.stack(arrays), tensor)
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
    return ObjectColumn(list(values))
