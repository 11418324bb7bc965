"""Reading a whole batch with one vectorised copy per field, and collating it.

torch calls ``Dataset.__getitems__`` for a batch and then the ``collate_fn``. The
items returned here are correct for the stock ``default_collate`` (each is a normal
item; its arrays are views into one private gathered array per field), and
``collate`` recognises a ``GatheredBatch`` and turns each gathered array into a
tensor without touching the items, which is where the speed comes from.

A shuffled batch of 64 touches nearly as many chunks as it has rows, so every cost
paid per chunk is paid per row: what a chunk's columns look like is worked out once
per mapped chunk (``_layout``), not once per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import torch

from raycache.chunk import Chunk, _Numbers, _Stacked

__all__ = ["GatheredBatch", "collate", "gather"]

# With fewer rows than this per chunk in a batch, rows are copied one by one: a Python
# step per row is cheaper than numpy's per-chunk work (grouping, fancy index, scatter)
# when each chunk holds only a row or two of the batch, as in a shuffled epoch.
GROUP_MIN_ROWS = 8
_ROW_MASK = np.int64(0xFFFFFFFF)
_LEAF = "*"
_ARRAY_KINDS = ("array", "tensor", "numbers")
# Attribute under which a mapped chunk keeps its layout (see ``_layout``).
_LAYOUT_ATTR = "_raycache_gather_layout"


class GatheredBatch(list):
    """A list of items that also carries the gathered per-field arrays they view.

    Attributes
    ----------
    template : Any
        The items' shared structure.
    columns : list of tuple
        ``(kind, values)`` per leaf: ``"array"``, ``"tensor"``, ``"numbers"`` hold one
        gathered numpy array; ``"list"`` holds one value per item.
    """

    template: Any = None
    columns: list = []


def _column_kind(column: Any) -> tuple:
    if isinstance(column, _Stacked):
        kind = "tensor" if column.tensor else "array"
        return (kind, column.data.dtype, column.data.shape[1:])
    if isinstance(column, _Numbers):
        return ("numbers", column.data.dtype, ())
    return ("list",)


def _layout(chunk: Chunk) -> tuple:
    """Return ``((template, kinds), sources)`` for a chunk, computed once per chunk.

    ``kinds`` has one entry per column; two chunks whose first element is equal can be
    gathered from together. ``sources`` holds the numpy array to index for each array
    column and the column itself for the others. A mapped chunk is immutable (its
    arrays are read-only views of shared memory), so the answer never goes stale.
    """
    layout = chunk.__dict__.get(_LAYOUT_ATTR)
    if layout is None:
        kinds = tuple(_column_kind(c) for c in chunk.columns)
        sources = tuple(
            c if kind[0] == "list" else c.data for c, kind in zip(chunk.columns, kinds)
        )
        layout = ((chunk.template, kinds), sources)
        chunk.__dict__[_LAYOUT_ATTR] = layout
    return layout


def _row_values(sources: Sequence[Any], rows: Sequence[int]) -> list:
    """Copies of one non-array column's values, one source column per row."""
    return [src.row(r, True) for src, r in zip(sources, rows)]


def _take_single(kind: tuple, source: Any, rows: np.ndarray) -> tuple:
    """Gather one column when every row comes from the same chunk."""
    if kind[0] == "list":
        return ("list", [source.row(r, True) for r in rows.tolist()])
    return (kind[0], source[rows])  # fancy indexing: one copy into a new array


def _take_rows(kinds: tuple, per_row: list, rows: list) -> list:
    """Gather every column row by row; ``per_row`` holds each row's chunk sources."""
    out = []
    for j, kind in enumerate(kinds):
        sources = [s[j] for s in per_row]
        if kind[0] == "list":
            out.append(("list", _row_values(sources, rows)))
            continue
        first = sources[0]
        values = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
        for p, (src, r) in enumerate(zip(sources, rows)):
            values[p] = src[r]
        out.append((kind[0], values))
    return out


def _groups(cids: np.ndarray) -> list[np.ndarray]:
    """Positions in the batch, split into one group per chunk."""
    order = np.argsort(cids, kind="stable")
    ordered = cids[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    return np.split(order, cuts)


def _take_grouped(kinds: tuple, layouts: dict, cids: np.ndarray, rows: np.ndarray) -> list:
    """Gather every column with one fancy-index copy per chunk."""
    groups = [(layouts[int(cids[g[0]])][1], g) for g in _groups(cids)]
    out = []
    for j, kind in enumerate(kinds):
        if kind[0] == "list":
            per_row = [layouts[c][1][j] for c in cids.tolist()]
            out.append(("list", _row_values(per_row, rows.tolist())))
            continue
        first = groups[0][0][j]
        values = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
        for sources, positions in groups:
            values[positions] = sources[j][rows[positions]]
        out.append((kind[0], values))
    return out


def _take_uniform(kinds: tuple, layouts: dict, cids: np.ndarray, rows: np.ndarray) -> list:
    """Gather a batch whose chunks all have the same column kinds."""
    if len(layouts) == 1:
        sources = next(iter(layouts.values()))[1]
        return [_take_single(kind, src, rows) for kind, src in zip(kinds, sources)]
    if len(rows) >= GROUP_MIN_ROWS * len(layouts):
        return _take_grouped(kinds, layouts, cids, rows)
    per_row = [layouts[c][1] for c in cids.tolist()]
    return _take_rows(kinds, per_row, rows.tolist())


def _take_mixed(chunks: dict, layouts: dict, cids: np.ndarray, rows: np.ndarray) -> list:
    """Gather a batch whose chunks store some field differently (say, ragged in one).

    A field stored as same-shaped arrays of one dtype (or numbers of one dtype) in every
    chunk is still gathered into one array; any other field becomes a list of copies.
    """
    ncols = len(next(iter(layouts.values()))[0][1])
    cid_list, row_list = cids.tolist(), rows.tolist()
    out = []
    for j in range(ncols):
        kinds = {lay[0][1][j] for lay in layouts.values()}
        kind = next(iter(kinds))
        if len(kinds) == 1 and kind[0] != "list":
            sub = {c: ((None, (kind,)), (lay[1][j],)) for c, lay in layouts.items()}
            out.extend(_take_uniform((kind,), sub, cids, rows))
        else:
            sources = [chunks[c].columns[j] for c in cid_list]
            out.append(("list", _row_values(sources, row_list)))
    return out


def _leaf_values(kind: str, values: Any) -> Any:
    """One value per item for a gathered leaf (views of the gathered array)."""
    if kind == "array":
        return list(values)
    if kind == "tensor":
        return torch.from_numpy(values).unbind(0)
    if kind == "numbers":
        return values.tolist()
    return values


def _assemble(template: Any, leaves: Iterator[Any], n: int) -> list:
    """Build ``n`` items from per-leaf value lists, one container level at a time."""
    if template == _LEAF:
        return next(leaves)
    kind = template[0]
    if kind == "d":
        keys = template[1]
        parts = [_assemble(t, leaves, n) for t in template[2]]
        if not parts:
            return [{} for _ in range(n)]
        return list(map(dict, map(zip, repeat(keys), zip(*parts))))
    parts = [_assemble(t, leaves, n) for t in template[1]]
    if not parts:
        return [[] for _ in range(n)] if kind == "l" else [() for _ in range(n)]
    return list(map(list, zip(*parts))) if kind == "l" else list(zip(*parts))


def gather(chunks: dict[int, Chunk], loc: np.ndarray) -> list:
    """Build the items at ``loc`` (``chunk << 32 | row``) from mapped chunks.

    Parameters
    ----------
    chunks : dict[int, Chunk]
        The mapped chunk of every chunk id in ``loc``.
    loc : np.ndarray
        Locations, all valid.

    Returns
    -------
    list
        A ``GatheredBatch`` when all rows share one structure, else a plain list of
        item copies. Either way every item is a private copy, safe to modify.
    """
    cids = loc >> 32
    rows = loc & _ROW_MASK
    layouts = {c: _layout(chunk) for c, chunk in chunks.items()}
    keys = {lay[0] for lay in layouts.values()}
    templates = {key[0] for key in keys}
    template = next(iter(templates))
    if len(templates) != 1 or template is None:
        return [chunks[c].row(r) for c, r in zip(cids.tolist(), rows.tolist())]
    if len(keys) == 1:
        columns = _take_uniform(next(iter(keys))[1], layouts, cids, rows)
    else:
        columns = _take_mixed(chunks, layouts, cids, rows)
    leaves = iter([_leaf_values(kind, values) for kind, values in columns])
    batch = GatheredBatch(_assemble(template, leaves, len(loc)))
    batch.template = template
    batch.columns = columns
    return batch


def _collate_values(values: list) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {k: _collate_values([v[k] for v in values]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_collate_values(list(group)) for group in zip(*values)]
    if isinstance(first, np.ndarray):
        first_shape = first.shape
        if all(isinstance(v, np.ndarray) and v.shape == first_shape for v in values):
            return torch.from_numpy(np.stack(values))
        return [torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for v in values]
    if isinstance(first, torch.Tensor):
        if all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
            return torch.stack(values)
        return list(values)
    if isinstance(first, (bool, int, float)) and all(type(v) is type(first) for v in values):
        return torch.tensor(values, dtype=torch.float64 if type(first) is float else None)
    if isinstance(first, np.generic) and all(type(v) is type(first) for v in values):
        return torch.from_numpy(np.array(values))
    return list(values)


def _collate_gathered(template: Any, columns: Iterator[tuple]) -> Any:
    if template == _LEAF:
        kind, values = next(columns)
        if kind in _ARRAY_KINDS:
            return torch.from_numpy(values)
        return _collate_values(values)
    if template[0] == "d":
        return {k: _collate_gathered(t, columns) for k, t in zip(template[1], template[2])}
    return [_collate_gathered(t, columns) for t in template[1]]


def collate(batch: Sequence[Any]) -> Any:
    """Turn a list of items into a batch of tensors, like torch's ``default_collate``.

    Same-shaped arrays and tensors are stacked, numbers become tensors (int64,
    float64, bool), strings and other values stay lists; dicts keep their keys and
    lists/tuples become lists. Unlike ``default_collate`` it also accepts ragged arrays
    and None (as lists). A ``GatheredBatch`` from ``CachedDataset.__getitems__`` is
    collated from its gathered arrays without a per-item step; the tensors share
    memory with the batch's items, which are private copies.

    Parameters
    ----------
    batch : Sequence[Any]
        Items.

    Returns
    -------
    Any
        The collated batch.
    """
    if isinstance(batch, GatheredBatch) and batch.template is not None:
        return _collate_gathered(batch.template, iter(batch.columns))
    if not len(batch):
        return []
    return _collate_values(list(batch))
