"""The columnar layout of a chunk: many cached items in one object-store object.

Every object in Ray's store costs a fixed ~0.1-0.7 ms to fetch and ~1 KB of control
plane metadata, so items are stored many to a chunk and a reader fetches a chunk once
and then indexes into it without calling Ray again. Items whose structure (dict keys,
list lengths, container types) is the same are stored column by column: one
contiguous ``(n, *shape)`` array per same-shaped array field, so a batch is gathered
with one vectorised copy per field. Ragged arrays share one flat buffer with offsets;
numbers share one numpy array; strings and other immutable leaves share one list.
Items whose structures differ fall back to a list of whole items.

A chunk is what ``ray.put`` stores: numpy buffers inside it travel out of band, so a
reader's ``ray.get`` maps them from shared memory without copying.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# numpy imports numpy.ma on the first np.unique or sorting np.isin, ~12 ms here (more on
# a loaded machine). Import it with raycache, not inside the first batch a trainer reads
# or the first reservation the directory actor answers while a trainer waits for it.
import numpy.ma  # noqa: F401

from raycache.columns import (
    ObjectColumn,
    StackedColumn,
    copy_leaves,
    make_column,
    same_dtype,
)
from raycache.values import Position, check_item

__all__ = [
    "MAX_CHUNK_ITEMS",
    "Chunk",
    "build_item",
    "chunk_rows",
    "flatten_checked",
    "flatten_item",
    "leaves_nbytes",
]

_LEAF = "*"


def flatten_item(item: Any, leaves: list) -> Any:
    """Return an item's template and append its leaves to ``leaves``, in one pass.

    The template is a hashable description of the item's containers (dicts, lists
    and tuples of exactly those types) with every leaf as ``"*"``. A subclass of one
    (a namedtuple, an ``OrderedDict``) is a leaf, kept as one value. A dict's keys are
    told apart by type as well as value where any is not a ``str`` (``1``, ``1.0`` and
    ``True`` are equal dict keys, but an item keeps the one it had).

    Parameters
    ----------
    item : Any
        A validated item.
    leaves : list
        Receives the leaves, depth first, in the order ``build_item`` consumes them.

    Returns
    -------
    Any
        Equal for two items exactly when they can share one set of columns.
    """
    kind = type(item)
    if kind is dict:
        return _dict_template(tuple(item), [flatten_item(v, leaves) for v in item.values()])
    if kind is list:
        return ("l", tuple([flatten_item(v, leaves) for v in item]))
    if kind is tuple:
        return ("t", tuple([flatten_item(v, leaves) for v in item]))
    leaves.append(item)
    return _LEAF


def flatten_checked(item: Any, leaves: list, path: tuple = ()) -> Any:
    """Validate an item as ``values.check_item`` does while flattening it.

    One walk, where an item on its way into a chunk (an insert, a preload read) took
    two: the same template and leaves as ``flatten_item``, and for a value raycache
    does not cache the same error, naming the same field path, as ``check_item``.

    Parameters
    ----------
    item : Any
        The item.
    leaves : list
        Receives the leaves (see ``flatten_item``).
    path : tuple, optional
        Where ``item`` sits inside the enclosing item (for error messages).

    Returns
    -------
    Any
        The template (see ``flatten_item``).

    Raises
    ------
    UnsupportedValueError
        If a value has a type raycache does not cache; the message names its path.
    """
    kind = type(item)
    if kind is dict:
        parts = [flatten_checked(v, leaves, path + (k,)) for k, v in item.items()]
        return _dict_template(tuple(item), parts)
    if kind is list or kind is tuple:
        parts = [flatten_checked(v, leaves, path + (Position(i),)) for i, v in enumerate(item)]
        return ("l" if kind is list else "t", tuple(parts))
    check_item(item, path)  # a leaf, or a container kept whole (a namedtuple)
    leaves.append(item)
    return _LEAF


def _dict_template(keys: tuple, parts: list) -> tuple:
    """``("d", keys, parts)``, plus the keys' types where any key is not a ``str``."""
    for key in keys:
        if type(key) is not str:
            return ("d", keys, tuple(parts), tuple(map(type, keys)))
    return ("d", keys, tuple(parts))


def leaves_nbytes(leaves: list) -> int:
    """Return what an item's leaves count for in chunk and flush sizes.

    The bytes of its arrays and tensors, plus a flat 64 per other leaf (a number, a
    short string): cheap to compute, and close enough to size chunks by.

    Parameters
    ----------
    leaves : list
        The leaves (see ``flatten_item``).

    Returns
    -------
    int
        Bytes.
    """
    return sum([int(getattr(leaf, "nbytes", 64)) for leaf in leaves])


def build_item(template: Any, leaves: Any) -> Any:
    """Rebuild an item from its template and an iterator over its leaf values."""
    if template is _LEAF or template == _LEAF:
        return next(leaves)
    kind = template[0]
    if kind == "d":
        return {k: build_item(t, leaves) for k, t in zip(template[1], template[2])}
    if kind == "l":
        return [build_item(t, leaves) for t in template[1]]
    return tuple(build_item(t, leaves) for t in template[1])


# A chunk whose item count is set by chunk_bytes alone holds at most this many items.
MAX_CHUNK_ITEMS = 1 << 20


def chunk_rows(chunk_size: int | None, chunk_bytes: int, item_bytes: float | None) -> int:
    """Return the most items one chunk may hold.

    Parameters
    ----------
    chunk_size : int or None
        ``raycache.chunk_size``; None: no item limit of its own.
    chunk_bytes : int
        ``raycache.chunk_bytes``.
    item_bytes : float or None
        Mean bytes per item, once known.

    Returns
    -------
    int
        At least 1.
    """
    rows = MAX_CHUNK_ITEMS if chunk_size is None else int(chunk_size)
    if item_bytes:
        rows = min(rows, int(chunk_bytes // max(1.0, float(item_bytes))))
    return max(1, rows)


class Chunk:
    """Many items stored together; rows are addressed by position ``0..n-1``.

    Parameters
    ----------
    indices : np.ndarray
        The provider index of each row (int64).
    template : Any
        The shared structure of all rows, or None when rows differ (row layout).
    columns : list
        One column per leaf position (columnar), or a single ``ObjectColumn`` of items.
    """

    def __init__(self, indices: np.ndarray, template: Any, columns: list):
        self.indices = indices
        self.template = template
        self.columns = columns

    @classmethod
    def from_rows(cls, indices: Sequence[int], rows: Sequence[Any]) -> Chunk:
        """Encode validated items (see ``values.copy_item``) into a chunk.

        Parameters
        ----------
        indices : Sequence[int]
            Provider index of each item.
        rows : Sequence[Any]
            The items, in the same order.

        Returns
        -------
        Chunk
            The encoded chunk; it copies every array it stores.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if not len(rows):
            return cls(idx, None, [ObjectColumn([])])
        per_row: list[list] = [[] for _ in rows]
        templates = [flatten_item(r, leaves) for r, leaves in zip(rows, per_row)]
        template = templates[0]
        if all(t == template for t in templates):
            columns = [
                make_column([leaves[j] for leaves in per_row]) for j in range(len(per_row[0]))
            ]
            return cls(idx, template, columns)
        return cls(idx, None, [ObjectColumn([copy_leaves(r, True) for r in rows])])

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data (columns), not counting Python overhead."""
        return int(sum(c.nbytes for c in self.columns))

    def row(self, r: int, copy: bool = True) -> Any:
        """Return row ``r`` as an item.

        Parameters
        ----------
        r : int
            Row position.
        copy : bool
            Copy arrays (safe to modify). False returns read-only views.

        Returns
        -------
        Any
            The item, rebuilt with its original containers and types.
        """
        if self.template is None:
            return self.columns[0].row(r, copy)
        return build_item(self.template, iter([c.row(r, copy) for c in self.columns]))

    def take(self, rows: np.ndarray) -> Chunk:
        """Return a new chunk holding only the given rows (copies their data).

        Parameters
        ----------
        rows : np.ndarray
            Row positions to keep.

        Returns
        -------
        Chunk
            The selection.
        """
        rows = np.asarray(rows, dtype=np.int64)
        return Chunk(self.indices[rows], self.template, [c.take(rows) for c in self.columns])

    @staticmethod
    def concat(chunks: Sequence[Chunk]) -> Chunk:
        """Join chunks into one, keeping their rows in order.

        Parameters
        ----------
        chunks : Sequence[Chunk]
            The chunks to join.

        Returns
        -------
        Chunk
            One chunk with all rows.
        """
        template = chunks[0].template
        same = template is not None and all(c.template == template for c in chunks)
        if same and all(
            isinstance(c.columns[j], StackedColumn) for c in chunks for j in range(len(c.columns))
        ):
            first = chunks[0].columns
            shapes_match = all(
                c.columns[j].data.shape[1:] == first[j].data.shape[1:]
                and c.columns[j].data.dtype == first[j].data.dtype
                and c.columns[j].tensor == first[j].tensor
                for c in chunks
                for j in range(len(first))
            )
            if shapes_match:
                columns = [
                    StackedColumn(
                        same_dtype(
                            np.concatenate([c.columns[j].data for c in chunks]),
                            first[j].data.dtype,
                        ),
                        first[j].tensor,
                    )
                    for j in range(len(first))
                ]
                return Chunk(np.concatenate([c.indices for c in chunks]), template, columns)
        indices = np.concatenate([c.indices for c in chunks])
        rows = [c.row(r, copy=False) for c in chunks for r in range(len(c))]
        return Chunk.from_rows(indices, rows)
