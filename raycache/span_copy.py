"""Copying a batch's rows out of many mapped chunks in one parallel copy.

A shuffled batch takes its rows from nearly as many chunks as it has rows. numpy can
gather from several arrays only row by row, a Python step and a one-core copy each.
But every mapped chunk lies in this process's mapping of the object store, so one
array that starts at the lowest chunk and ends after the highest, viewed so that a row
starts at every element, holds every row of every chunk. ``torch.index_select`` then
copies all the rows of a batch in one call, split over torch's intra-op threads
(``torch.get_num_threads()``; DataLoader workers have one).

With two or more torch threads on idle cores it copies a batch of big rows faster than
a row-by-row copy; with one, or on cores that other processes keep busy, it is slower
(docs/design.md, "One copy for a big batch"), so ``raycache.batch`` uses it only where
``raycache.copy_choice`` has measured that it pays.

Only rows of chunks the caller holds are read: the span's other bytes (other objects,
or no memory at all) are never touched, and every offset is checked against its chunk
before the copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["RowSpan", "copy_rows", "row_span"]

# Element types the copy moves bytes as: wider is faster (torch copies a uint8 row about
# 1.6x slower than the same bytes as int64).
_WORDS = {8: (np.int64, "<i8"), 4: (np.int32, "<i4"), 2: (np.int16, "<i2"), 1: (np.uint8, "|u1")}

# RowSpan: where a chunk column's rows lie, ``(address, row_stride, rows)``.
RowSpan = tuple


def row_span(source: Any) -> RowSpan | None:
    """Return ``(address, row_stride, rows)`` of an array whose rows are contiguous.

    Parameters
    ----------
    source : Any
        A chunk column's data: an ``(n, *shape)`` numpy array.

    Returns
    -------
    tuple or None
        The address of row 0, the bytes from one row to the next and the row count;
        None if the rows cannot be copied as plain bytes (not a numpy array, Python
        objects inside, or each row not contiguous).
    """
    if type(source) is not np.ndarray or source.ndim == 0 or source.dtype.hasobject:
        return None
    if len(source) > 1 and source.strides[0] <= 0:
        return None  # row 0 must be the lowest
    if source.ndim > 1 and len(source) and not source[0].flags.c_contiguous:
        return None
    return (source.__array_interface__["data"][0], source.strides[0], len(source))


class _Span:
    """Exposes ``count`` words at ``address`` to numpy, keeping ``keep`` alive.

    Writable only in name: torch refuses read-only numpy memory with a warning, and the
    span is only ever read by ``index_select``.
    """

    def __init__(self, address: int, count: int, typestr: str, keep: Any):
        self.__array_interface__ = {
            "shape": (count,),
            "typestr": typestr,
            "data": (address, False),
            "version": 3,
        }
        self._keep = keep


def copy_rows(
    sources: Sequence[np.ndarray],
    spans: Sequence[RowSpan],
    which: np.ndarray,
    rows: np.ndarray,
) -> np.ndarray:
    """Copy row ``rows[p]`` of ``sources[which[p]]`` into row ``p`` of a new array.

    Parameters
    ----------
    sources : Sequence[np.ndarray]
        Arrays of one dtype and row shape (``row_span`` of each is ``spans``).
    spans : Sequence[RowSpan]
        ``row_span`` of each source.
    which : np.ndarray
        For each row of the result, the position of its source.
    rows : np.ndarray
        For each row of the result, its row in that source.

    Returns
    -------
    np.ndarray
        ``(len(rows), *row_shape)``, a private copy.

    Raises
    ------
    IndexError
        If a row is out of its source's range.
    """
    first = sources[0]
    shape = first.shape[1:]
    out = np.empty((len(rows),) + shape, dtype=first.dtype)
    row_bytes = out.itemsize * (out.size // len(rows)) if len(rows) else 0
    if not len(rows) or not row_bytes:
        return out
    table = np.array(spans, dtype=np.int64)  # address, stride, rows per source
    bad = (rows < 0) | (rows >= table[which, 2])
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        count = int(table[which[p], 2])
        raise IndexError(f"row {int(rows[p])} is out of range of its chunk ({count} rows)")
    starts = table[which, 0] + rows * table[which, 1]
    base = int(table[:, 0].min())
    ends = table[:, 0] + np.maximum(table[:, 2] - 1, 0) * table[:, 1] + row_bytes
    # Widest word that every row start (relative to the span) and the row length share.
    offsets = starts - base
    common = int(np.bitwise_or.reduce(offsets)) | row_bytes | 8
    word = common & -common
    numpy_word, typestr = _WORDS[word]
    count = (int(ends.max()) - base) // word
    row_words = row_bytes // word
    import torch  # here, not on import: a process that never copies a batch does not need it

    span = torch.from_numpy(np.asarray(_Span(base, count, typestr, sources)))
    every_start = span.as_strided((count - row_words + 1, row_words), (1, 1))
    target = torch.from_numpy(out.view(np.uint8).reshape(len(rows), row_bytes).view(numpy_word))
    torch.index_select(every_start, 0, torch.from_numpy(offsets // word), out=target)
    return out
