"""Where each row of each mapped chunk lies, so that a batch over many chunks is one copy.

A shuffled batch takes its rows from many chunks, and numpy can gather from several
arrays only row by row: a Python step per row, ~0.7 us, more than a 1 KiB row's copy.
Every mapped chunk lies in this process's address space, though, so one array viewed
over the addresses from the lowest chunk to the end of the highest, with a row starting
at every word, holds every row of every chunk; one fancy index of that array copies a
whole column of a batch on this thread, in one numpy call.

``SpanTable`` keeps, per chunk id, where each column's rows start, their stride and
count, so a batch costs a few numpy operations per column, whatever the number of
chunks it touches. It is built once per chunk, the first time a batch reads from it.

Guarantees:

- A row is read only if its chunk is one of the batch's chunks (the caller holds them,
  so their memory stays mapped) and the row is within that chunk: the table keeps no
  reference to any chunk, and an entry is used only for the chunk object it was made
  from (each mapped chunk's layout carries a serial number never given twice), so an
  entry of a chunk since dropped, or of another cache's chunk with the same id, is
  never read from.
- A row out of its chunk's range raises ``IndexError``; nothing outside is read.
- State is replaced whole, never changed in place: a thread reads one state throughout a
  batch, and threads sharing a table (rebuilding it for each other's chunks) still copy
  exactly, at worst more slowly.
"""

from __future__ import annotations

import ctypes
import itertools
import math
from collections.abc import Callable
from functools import partial
from operator import itemgetter
from typing import NamedTuple

import numpy as np

__all__ = ["SpanState", "SpanTable", "describe", "new_serial"]

# A table that has described this many chunks starts again from the batch's chunks (the
# entries of chunks dropped since are never used, only kept).
MAX_DESCRIBED = 4096
# Positions in a batch layout tuple (``raycache.batch._layout``).
_LAYOUT_ID, _KINDS, _SPANS, _SERIAL = 0, 2, 4, 5

_serials = itertools.count(1)


def new_serial() -> int:
    """Return a number no other call in this process has returned (0 is never given)."""
    return next(_serials)


class SpanState(NamedTuple):
    """Where the rows of some chunks lie, per column (``SpanTable``'s state, ``describe``)."""

    layout_id: int
    serial_of: dict  # chunk id -> the serial of the chunk described
    count: np.ndarray  # per chunk id: its rows (0: not described)
    # Per column with a span, by chunk id: words from the column's span base to row 0,
    # and from one row to the next (one 1-D array each: a 1-D take is the fast one).
    start: tuple
    stride: tuple
    # Per column, its span: a read-only ``(positions, *shape)`` array of the column's
    # dtype, a row starting at every word; None where rows are not plain bytes.
    columns: tuple
    spans_of: dict  # chunk id -> its layout's spans


_EMPTY = SpanState(-1, {}, np.zeros(0, np.int64), (), (), (), {})


class SpanTable:
    """Row addresses of the mapped chunks of one cache, by chunk id, for batch copies."""

    def __init__(self) -> None:
        self._state = _EMPTY

    def columns(
        self, layouts: dict[int, tuple], cids: np.ndarray, rows: np.ndarray
    ) -> list[Callable[[], np.ndarray] | None] | None:
        """Return, per column, a function that copies the batch's rows of that column.

        Parameters
        ----------
        layouts : dict[int, tuple]
            The batch's chunk ids and their layouts (``raycache.batch``; one layout id).
        cids : numpy.ndarray
            Each row's chunk id.
        rows : numpy.ndarray
            Each row's row in its chunk.

        Returns
        -------
        list or None
            Per column, a function returning a new ``(len(rows), *shape)`` array, or
            None where the column's rows are not plain bytes; None if no column's are.

        Raises
        ------
        IndexError
            If a row is out of its chunk's range.
        """
        state = self._state
        serial_of = state.serial_of
        layout_id = next(iter(layouts.values()))[_LAYOUT_ID]
        if layout_id != state.layout_id or list(map(serial_of.get, layouts)) != list(
            map(itemgetter(_SERIAL), layouts.values())
        ):
            state = self._state = _described(state, layout_id, layouts)
        if all(c is None for c in state.columns):
            return None
        count = state.count[cids]
        if (rows >= count).any():
            p = int(np.flatnonzero(rows >= count)[0])
            raise IndexError(
                f"row {int(rows[p])} is out of range of its chunk ({int(count[p])} rows)"
            )
        return [
            None if c is None else partial(_take, c, start[cids] + rows * stride[cids])
            for c, start, stride in zip(state.columns, state.start, state.stride)
        ]


def _take(span: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Copy the rows starting at ``starts`` (words) with one fancy index of the span.

    The result owns its memory (it is not a view of another array): ``raycache.gathered``
    recognises a batch's rows by the array they are rows of.
    """
    return span[starts]


def describe(layouts: dict[int, tuple]) -> SpanState:
    """Return where the rows of the chunks of ``layouts`` lie (one layout id).

    Parameters
    ----------
    layouts : dict[int, tuple]
        Chunk ids and their layouts (``raycache.batch.layouts_of``), all of one layout id.

    Returns
    -------
    SpanState
        Per column its span (None where rows are not plain bytes) and, by chunk id, the
        words to row 0 and from row to row; per chunk id its rows (0: not among them).
    """
    layout_id = next(iter(layouts.values()))[_LAYOUT_ID]
    return _described(_EMPTY, layout_id, layouts)


def _described(state: SpanState, layout_id: int, layouts: dict[int, tuple]) -> SpanState:
    """Return ``state`` with the chunks of ``layouts`` described (a new state)."""
    same = layout_id == state.layout_id and len(state.serial_of) + len(layouts) <= MAX_DESCRIBED
    serial_of = dict(state.serial_of) if same else {}
    spans_of = dict(state.spans_of) if same else {}
    for cid, lay in layouts.items():
        serial_of[cid] = lay[_SERIAL]
        spans_of[cid] = lay[_SPANS]
    size = max(spans_of) + 1
    cids = np.fromiter(spans_of, np.int64, len(spans_of))
    kinds = next(iter(layouts.values()))[_KINDS]
    count = np.zeros(size, np.int64)
    start = np.zeros((len(kinds), size), np.int64)
    stride = np.zeros((len(kinds), size), np.int64)
    columns = []
    for j, kind in enumerate(kinds):
        spans = [s[j] for s in spans_of.values()]
        column = None
        if kind[0] != "list" and all(s is not None for s in spans):
            column = _column(kind, np.array(spans, dtype=np.int64), cids, start[j], stride[j])
        if column is not None and all(c is None for c in columns):
            count[cids] = [s[2] for s in spans]  # every column of a chunk has its rows
        columns.append(column)
    return SpanState(
        layout_id, serial_of, count, tuple(start), tuple(stride), tuple(columns), spans_of
    )


def _column(
    kind: tuple, spans: np.ndarray, cids: np.ndarray, start: np.ndarray, stride: np.ndarray
) -> np.ndarray | None:
    """Return one column's span over the chunks ``cids``; fill its ``start`` and ``stride``.

    ``spans`` holds each chunk's ``(address, row stride, rows)`` (``row_span``).
    """
    dtype, shape = kind[1], kind[2]
    row_bytes = dtype.itemsize * math.prod(shape)
    if not row_bytes:
        return None
    address, step, rows = spans[:, 0], spans[:, 1], spans[:, 2]
    base = int(address.min())
    end = int((address + np.maximum(rows - 1, 0) * step).max()) + row_bytes
    common = int(np.bitwise_or.reduce(address - base)) | int(np.bitwise_or.reduce(step))
    common |= 8
    word = common & -common
    positions = (end - base - row_bytes) // word + 1
    buffer = (ctypes.c_char * (end - base)).from_address(base)
    row_strides = np.empty(0, dtype).reshape((0,) + tuple(shape)).strides[1:]
    view = np.ndarray((positions, *shape), dtype, buffer, 0, (word, *row_strides))
    view.flags.writeable = False
    start[cids] = (address - base) // word
    stride[cids] = step // word
    return view
