"""Reading a whole batch from mapped chunks with one vectorised copy per field.

``gather`` turns a batch's locations into a ``GatheredBatch`` (``raycache.gathered``):
one private array per field, which ``collate`` hands to torch without a per-item step.

A shuffled batch of 64 touches nearly as many chunks as it has rows, so every cost
paid per chunk is paid per row: what a chunk's columns look like is worked out once
per mapped chunk (``_layout``), not once per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

from raycache.chunk import Chunk
from raycache.columns import NumberColumn, StackedColumn
from raycache.copy_choice import chosen_copy
from raycache.gathered import GatheredBatch, collate
from raycache.protocol import chunk_ids
from raycache.protocol import rows as location_rows
from raycache.span_copy import copy_rows, row_span
from raycache.span_table import SpanTable, new_serial

__all__ = [
    "GatheredBatch",
    "chunk_groups",
    "collate",
    "gather",
    "layouts_of",
    "read_partial",
    "take_single",
]

# How a batch spread over several chunks is gathered (measured, 2-core EPYC): copying
# row by row costs a Python step (~0.4 us) per row; gathering per chunk costs ~10 us per
# chunk and a second copy (fancy index, then scatter). Per chunk only wins for small
# rows of chunks holding many rows of the batch; a shuffled batch of 64 touches nearly
# as many chunks as it has rows.
GROUP_MIN_ROWS = 64
GROUP_MAX_BYTES = 4096
# Columns whose rows ``copy_rows`` can copy in one call over every chunk of a batch, and
# the bytes of a column's batch from which it may: a call costs more than copying row
# by row (or numpy's fancy index of one chunk), and copies over torch's threads, which
# pays for big copies only, and only while the node has idle cores: whether it is used
# for a big copy is measured, per process, by ``raycache.copy_choice``.
_COPY_KINDS = ("array", "tensor")
COPY_ROWS_MIN_BYTES = 512 * 1024
# Attribute under which a mapped chunk keeps its layout (see ``_layout``).
_LAYOUT_ATTR = "_raycache_gather_layout"
_known_layout = attrgetter(_LAYOUT_ATTR)
# Layout descriptions interned as small ints: comparing the chunks of a batch then
# hashes an int per chunk instead of a nested tuple of templates and dtypes.
_LAYOUT_IDS: dict[tuple, int] = {}


def _column_kind(column: Any) -> tuple:
    if isinstance(column, StackedColumn):
        kind = "tensor" if column.tensor else "array"
        return (kind, column.data.dtype, column.data.shape[1:])
    if isinstance(column, NumberColumn):
        return ("scalars" if column.scalar else "numbers", column.data.dtype, ())
    return ("list",)


def _layout(chunk: Chunk) -> tuple:
    """Return ``(layout_id, template, kinds, sources, spans, serial)`` for a chunk, once.

    ``kinds`` has one entry per column; chunks with the same ``layout_id`` have the same
    template and kinds and can be gathered from together. ``sources`` holds the numpy
    array to index for each array column and the column itself for the others;
    ``spans`` where each array or number column's rows lie, for ``copy_rows`` and
    ``SpanTable`` (None where they cannot be copied as bytes, and for the other
    columns); ``serial`` tells this chunk object from any other (``new_serial``). A
    mapped chunk is immutable (its arrays are read-only views of shared memory), so the
    answer never goes stale.
    """
    layout = getattr(chunk, _LAYOUT_ATTR, None)
    if layout is None:
        kinds = tuple(_column_kind(c) for c in chunk.columns)
        sources = tuple(c if kind[0] == "list" else c.data for c, kind in zip(chunk.columns, kinds))
        spans = tuple(
            row_span(src) if kind[0] != "list" else None for src, kind in zip(sources, kinds)
        )
        layout_id = _LAYOUT_IDS.setdefault((chunk.template, kinds), len(_LAYOUT_IDS))
        layout = (layout_id, chunk.template, kinds, sources, spans, new_serial())
        setattr(chunk, _LAYOUT_ATTR, layout)
    return layout


def layouts_of(chunks: Iterable[Chunk]) -> list:
    """Return each chunk's layout (see ``_layout``), worked out once per mapped chunk.

    Parameters
    ----------
    chunks : Iterable[Chunk]
        Mapped chunks.

    Returns
    -------
    list
        Their layouts, in order; the common case (all known) is one C-level pass.
    """
    chunks = list(chunks)
    try:
        return list(map(_known_layout, chunks))
    except AttributeError:
        return [_layout(c) for c in chunks]


def _row_values(sources: Sequence[Any], rows: Sequence[int]) -> list:
    """Return copies of one non-array column's values, one source column per row."""
    return [src.row(r, True) for src, r in zip(sources, rows)]


def _copy_bytes(kind: tuple, count: int) -> int:
    """Return the bytes of ``count`` rows of a column of ``kind``."""
    return count * kind[1].itemsize * math.prod(kind[2])


def _copies_rows(kind: tuple, count: int) -> bool:
    """Return True if ``count`` rows of a column of ``kind`` may be copied by ``copy_rows``.

    Whether they are, or are copied on this thread alone, is ``chosen_copy``'s call:
    on one thread ``copy_rows`` is slower than the row-by-row copy.
    """
    return kind[0] in _COPY_KINDS and _copy_bytes(kind, count) >= COPY_ROWS_MIN_BYTES


def take_single(kind: tuple, source: Any, rows: np.ndarray, span: Any = None) -> tuple:
    """Gather one column when every row comes from the same array.

    Parameters
    ----------
    kind : tuple
        The column's kind (``_column_kind``).
    source : Any
        The column: a numpy array, or a column object for ``("list",)``.
    rows : numpy.ndarray
        The rows to copy, in order.
    span : RowSpan, optional
        ``row_span(source)``: with it, a big column may be copied over torch's pool.

    Returns
    -------
    tuple
        ``(kind, values)``, the values a private copy.
    """
    if kind[0] == "list":
        return ("list", [source.row(r, True) for r in rows.tolist()])
    if span is not None and _copies_rows(kind, len(rows)):
        which = np.zeros(len(rows), dtype=np.intp)
        pool = partial(_column_span, kind, [source], [span], which, rows)
        return chosen_copy(_copy_bytes(kind, len(rows)), pool, partial(_fancy, kind, source, rows))
    return _fancy(kind, source, rows)


def _fancy(kind: tuple, source: np.ndarray, rows: np.ndarray) -> tuple:
    """Gather one column of one chunk with numpy's fancy index: one copy, one thread."""
    return (kind[0], source[rows])  # fancy indexing: one copy into a new array


def _positions(sources_of: dict, cids: np.ndarray) -> tuple[list, np.ndarray]:
    """Return the chunk ids of ``sources_of`` and, per row, the position of its chunk."""
    keys = list(sources_of)
    ids = np.fromiter(keys, dtype=np.int64, count=len(keys))
    order = np.argsort(ids)
    return keys, order[np.searchsorted(ids, cids, sorter=order)]


def _column_rows(kind: tuple, sources: list, rows: list) -> tuple:
    """Gather one column row by row; ``sources`` holds the column of each row's chunk."""
    if kind[0] == "list":
        return ("list", _row_values(sources, rows))
    if kind[0] in ("numbers", "scalars"):
        # .item() gives the Python number without a numpy scalar in between.
        return (kind[0], np.array(list(map(np.ndarray.item, sources, rows)), dtype=kind[1]))
    first = sources[0]
    values = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
    for p, src, r in zip(range(len(rows)), sources, rows):
        values[p] = src[r]
    return (kind[0], values)


def _column_grouped(
    kind: tuple, j: int, groups: list, sources_of: dict, cids: np.ndarray, rows: np.ndarray
) -> tuple:
    """Gather one array column with one fancy index and one scatter per chunk."""
    first = next(iter(sources_of.values()))[j]
    values = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
    for positions in groups:
        values[positions] = sources_of[int(cids[positions[0]])][j][rows[positions]]
    return (kind[0], values)


def chunk_groups(cids: np.ndarray) -> list[np.ndarray]:
    """Return the positions of ``cids``, split into one group per chunk id.

    Parameters
    ----------
    cids : numpy.ndarray
        A chunk id per position (a batch's rows, say); not empty.

    Returns
    -------
    list of numpy.ndarray
        The positions holding each chunk id, by ascending id, each in order.
    """
    order = np.argsort(cids, kind="stable")
    ordered = cids[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    return np.split(order, cuts)


def _row_bytes(source: np.ndarray) -> int:
    return source.itemsize * math.prod(source.shape[1:])


def _take_uniform(
    kinds: tuple,
    sources_of: dict,
    cids: np.ndarray,
    rows: np.ndarray,
    spans_of: dict | None = None,
    spanned: list | None = None,
) -> list:
    """Gather a batch whose chunks all have the same column kinds.

    ``sources_of`` maps each chunk id to its per-column sources and ``spans_of`` to
    their row spans (see ``_layout``); ``spanned`` holds, per column, the one-thread
    copy of ``SpanTable.columns`` (or None). An array column whose rows every chunk
    holds as plain bytes is copied with one ``copy_rows`` call over all the chunks, when
    the column's batch is big enough (``COPY_ROWS_MIN_BYTES``) and that measured faster
    than the one-thread copy. The one-thread copy: one chunk, one fancy index per
    column; several, the ``SpanTable``'s one fancy index where the table covers the
    column, else rows copied one by one (a Python step per row), or, for small rows of
    chunks that each hold many rows of the batch, per chunk (no Python step per row,
    but a second copy).
    """
    if len(sources_of) == 1:
        sources = next(iter(sources_of.values()))
        spans = (None,) * len(kinds) if spans_of is None else next(iter(spans_of.values()))
        return [take_single(k, src, rows, sp) for k, src, sp in zip(kinds, sources, spans)]
    per_row = row_list = groups = positions = None
    out = []
    for j, kind in enumerate(kinds):
        if spanned is not None and spanned[j] is not None:
            one_thread = partial(_spanned, kind, spanned[j])
        else:
            if per_row is None:
                per_row = list(map(sources_of.__getitem__, cids.tolist()))
                row_list = rows.tolist()
                if len(rows) >= GROUP_MIN_ROWS * len(sources_of):
                    groups = chunk_groups(cids)
            sources = list(map(itemgetter(j), per_row))
            small = kind[0] != "list" and _row_bytes(sources[0]) <= GROUP_MAX_BYTES
            if groups is not None and small:
                one_thread = partial(_column_grouped, kind, j, groups, sources_of, cids, rows)
            else:
                one_thread = partial(_column_rows, kind, sources, row_list)
        if (
            spans_of is not None
            and _copies_rows(kind, len(rows))
            and all(spans[j] is not None for spans in spans_of.values())
        ):
            if positions is None:
                positions = _positions(sources_of, cids)
            keys, which = positions
            span_sources = [sources_of[c][j] for c in keys]
            pool = partial(_column_span, kind, span_sources, [spans_of[c][j] for c in keys])
            out.append(
                chosen_copy(_copy_bytes(kind, len(rows)), partial(pool, which, rows), one_thread)
            )
        else:
            out.append(one_thread())
    return out


def _spanned(kind: tuple, take: Any) -> tuple:
    """Gather one column with ``SpanTable``'s copy (``take``)."""
    return (kind[0], take())


def _chosen_spanned(
    kind: tuple, j: int, take: Any, layouts: dict, cids: np.ndarray, rows: np.ndarray
) -> tuple:
    """Gather column ``j`` with ``SpanTable``'s copy or, if big and it pays, the pool's.

    The table covers the column, so every chunk's rows of it are plain bytes; the pool
    copy's sources are looked up only when the pool is chosen (a few in a thousand
    batches on a busy node).
    """
    if not _copies_rows(kind, len(rows)):
        return _spanned(kind, take)
    return chosen_copy(
        _copy_bytes(kind, len(rows)),
        partial(_pooled_column, kind, j, layouts, cids, rows),
        partial(_spanned, kind, take),
    )


def _pooled_column(kind: tuple, j: int, layouts: dict, cids: np.ndarray, rows: np.ndarray) -> tuple:
    """Gather column ``j`` of chunks with ``layouts`` with one ``copy_rows`` call."""
    keys, which = _positions(layouts, cids)
    sources = [layouts[c][3][j] for c in keys]
    return _column_span(kind, sources, [layouts[c][4][j] for c in keys], which, rows)


def _column_span(
    kind: tuple, sources: list, spans: list, which: np.ndarray, rows: np.ndarray
) -> tuple:
    """Gather one array column with one ``copy_rows`` call over all its chunks."""
    return (kind[0], copy_rows(sources, spans, which, rows))


def _take_mixed(chunks: dict, layouts: dict, cids: np.ndarray, rows: np.ndarray) -> list:
    """Gather a batch whose chunks store some field differently (say, ragged in one).

    A field stored as same-shaped arrays of one dtype (or numbers of one dtype) in every
    chunk is still gathered into one array; any other field becomes a list of copies.
    """
    out = []
    for j in range(len(next(iter(layouts.values()))[2])):
        kinds = {lay[2][j] for lay in layouts.values()}
        kind = next(iter(kinds)) if len(kinds) == 1 else ("list",)
        spans_of = None
        if kind[0] == "list":  # every column kind answers row(r, copy)
            sources_of = {c: (chunks[c].columns[j],) for c in layouts}
        else:
            sources_of = {c: (lay[3][j],) for c, lay in layouts.items()}
            spans_of = {c: (lay[4][j],) for c, lay in layouts.items()}
        out.extend(_take_uniform((kind,), sources_of, cids, rows, spans_of))
    return out


def gather(chunks: dict[int, Chunk], loc: np.ndarray, table: SpanTable | None = None) -> list:
    """Build the items at ``loc`` (``raycache.protocol`` locations) from mapped chunks.

    Parameters
    ----------
    chunks : dict[int, Chunk]
        The mapped chunk of every chunk id in ``loc``.
    loc : np.ndarray
        Locations, all valid.
    table : SpanTable, optional
        The row addresses of the cache's chunks, kept by the caller from batch to
        batch: a column of a batch over several chunks is then one copy (else a Python
        step per row).

    Returns
    -------
    list
        A ``GatheredBatch`` when all rows share one structure, else a plain list of
        item copies. Either way every item is a private copy, safe to modify.
    """
    cids = chunk_ids(loc)
    rows = location_rows(loc)
    layouts = dict(zip(chunks, layouts_of(chunks.values())))
    first = next(iter(layouts.values()))
    template = first[1]
    uniform = len(set(map(itemgetter(0), layouts.values()))) == 1
    if template is None or not (uniform or all(lay[1] == template for lay in layouts.values())):
        # Items of different structures: no shared columns to gather from.
        return [chunks[c].row(r) for c, r in zip(cids.tolist(), rows.tolist())]
    if uniform:
        kinds = first[2]
        big = any(_copies_rows(kind, len(loc)) for kind in kinds)
        spanned = None
        if table is not None and len(layouts) > 1:
            spanned = table.columns(layouts, cids, rows)
        if spanned is not None and None not in spanned:
            # The common warm batch: every column one fancy index; a big column's copy
            # may run on torch's pool instead, and only then are its sources looked up.
            if big:
                columns = [
                    _chosen_spanned(kind, j, take, layouts, cids, rows)
                    for j, (kind, take) in enumerate(zip(kinds, spanned))
                ]
            else:
                columns = list(map(_spanned, kinds, spanned))
            return GatheredBatch.of(template, columns, len(loc))
        sources_of = dict(zip(layouts, map(itemgetter(3), layouts.values())))
        spans_of = dict(zip(layouts, map(itemgetter(4), layouts.values()))) if big else None
        columns = _take_uniform(kinds, sources_of, cids, rows, spans_of, spanned)
    else:
        columns = _take_mixed(chunks, layouts, cids, rows)
    return GatheredBatch.of(template, columns, len(loc))


def read_partial(client: Any, idx: np.ndarray, loc: np.ndarray, copy: bool, wait: bool) -> list:
    """Read a batch that is not all cached and mapped: the items, None for each miss.

    Rows of chunks that cannot be mapped count as misses; a miss is looked up once
    more (``CacheClient.get``): it may be buffered in this process, or just mapped.

    Parameters
    ----------
    client : CacheClient
        The attached client.
    idx : numpy.ndarray
        The indices.
    loc : numpy.ndarray
        Their locations (``client.locate``), ``MISSING`` for misses.
    copy : bool
        Return private copies (else read-only views where an item is not gathered).
    wait : bool
        As for ``CacheClient.get``.

    Returns
    -------
    list
        A ``GatheredBatch`` if every row could be gathered, else the items in order.
    """
    hit = loc >= 0
    cid_of = chunk_ids(loc)
    cids = np.unique(cid_of[hit])
    chunks = dict(zip(cids.tolist(), client.views(cids)))
    if any(v is None for v in chunks.values()):
        hit &= np.isin(cid_of, [c for c, v in chunks.items() if v is not None])
    if hit.all() and copy:
        return gather(chunks, loc)
    out = [None] * len(idx)
    row_of = location_rows(loc).tolist()
    cid_list = cid_of.tolist()
    for p in np.flatnonzero(hit).tolist():
        out[p] = chunks[cid_list[p]].row(row_of[p], copy)
    # ``locate`` asked about the misses once for the batch: without ``wait`` a miss is
    # only looked up here (mapped since, or buffered by this process), not asked again.
    for p in np.flatnonzero(~hit).tolist():
        out[p] = client.get(int(idx[p]), copy, wait, refresh=False)
    return out
