"""Reading a whole batch with one vectorised copy per field, and collating it.

torch calls ``Dataset.__getitems__`` for a batch and then the ``collate_fn``. The
items returned here are correct for the stock ``default_collate`` (each is a normal
item; its arrays are views into one private gathered array per field), and
``collate`` recognises a ``GatheredBatch`` and turns each gathered array into a
tensor without touching the items, which is where the speed comes from.

The stock ``default_collate`` would stack the rows again: a second copy of the batch.
torch dispatches it on the element type through ``default_collate_fn_map``, which it
documents as the way to extend it; raycache wraps the entries for numpy arrays and
tensors so that a list that is exactly the rows of one gathered array, in order, is
answered with that array (it already is the stacked batch). Anything else goes to
torch's own function, so other arrays collate as before.

A shuffled batch of 64 touches nearly as many chunks as it has rows, so every cost
paid per chunk is paid per row: what a chunk's columns look like is worked out once
per mapped chunk (``_layout``), not once per batch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import attrgetter, is_, itemgetter
from typing import Any

import numpy as np
import torch
from torch.utils.data._utils.collate import default_collate_fn_map

from raycache.chunk import Chunk, _Numbers, _Stacked
from raycache.protocol import chunk_ids
from raycache.protocol import rows as location_rows
from raycache.span_copy import copy_rows, row_span

__all__ = ["GatheredBatch", "collate", "gather"]

# How a batch spread over several chunks is gathered (measured, 2-core EPYC): copying
# row by row costs a Python step (~0.4 us) per row; gathering per chunk costs ~10 us per
# chunk and a second copy (fancy index, then scatter). Per chunk only wins for small
# rows of chunks holding many rows of the batch; a shuffled batch of 64 touches nearly
# as many chunks as it has rows.
GROUP_MIN_ROWS = 64
GROUP_MAX_BYTES = 4096
_LEAF = "*"
_ARRAY_KINDS = ("array", "tensor", "numbers")
# Columns whose rows ``copy_rows`` can copy in one call over every chunk of a batch, and
# the bytes of a column's batch from which it does: it costs ~30 us more than copying row
# by row (or numpy's fancy index of one chunk), and copies over torch's threads, which
# pays for big copies only (measured 2026-12-02, 2 threads: 64 rows of 48 KiB 420-450 ->
# 270-335 us; 64 rows of 1 KiB from ~12 chunks 20% slower than row by row).
_COPY_KINDS = ("array", "tensor")
COPY_ROWS_MIN_BYTES = 512 * 1024
# Attribute under which a mapped chunk keeps its layout (see ``_layout``).
_LAYOUT_ATTR = "_raycache_gather_layout"
_known_layout = attrgetter(_LAYOUT_ATTR)
# Layout descriptions interned as small ints: comparing the chunks of a batch then
# hashes an int per chunk instead of a nested tuple of templates and dtypes.
_LAYOUT_IDS: dict[tuple, int] = {}
# Functions that build a batch's dicts, one per key tuple (see ``_dict_maker``).
_DICT_MAKERS: dict[tuple, Callable[[list], list]] = {}


class GatheredBatch(list):
    """A list of items that also carries the gathered per-field arrays they view.

    The items (a dict and a row view per item and field) are built the first time the
    list is used as a list. ``collate`` reads the arrays alone, so a batch it turns
    into tensors never builds them: for 1 KiB items that was ~7% of serving a batch.

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
    # id(base) -> the row views handed out in the items, for ``default_collate``.
    rows_of: dict = {}
    _unbuilt = 0  # items still to build from the columns
    _handed_out = False  # ``collate`` gave the arrays away: items must not offer them

    def _build_items(self) -> None:
        count, self._unbuilt = self._unbuilt, 0
        if count:
            batch = None if self._handed_out else self
            leaves = iter([_leaf_values(kind, values, batch) for kind, values in self.columns])
            list.extend(self, _assemble(self.template, leaves, count))

    def __radd__(self, other: Any) -> Any:
        self._build_items()
        return other + list(self)


def _building(name: str) -> Callable:
    """Return list method ``name``, building the items before it runs.

    Those of the other operand too: list-to-list operators read its storage directly.
    """
    method = getattr(list, name)

    def call(self: GatheredBatch, *args: Any, **kwargs: Any) -> Any:
        self._build_items()
        for arg in args:
            if isinstance(arg, GatheredBatch):
                arg._build_items()
        return method(self, *args, **kwargs)

    call.__name__ = name
    call.__qualname__ = f"GatheredBatch.{name}"
    call.__doc__ = method.__doc__
    return call


for _name in (
    "__len__", "__getitem__", "__setitem__", "__delitem__", "__iter__", "__reversed__",
    "__contains__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__",
    "__iadd__", "__mul__", "__rmul__", "__imul__", "__repr__", "__reduce_ex__",
    "__sizeof__", "append", "extend", "insert", "pop", "remove", "index", "count", "sort",
    "reverse", "copy", "clear",
):  # fmt: skip
    setattr(GatheredBatch, _name, _building(_name))
del _name


# id of a gathered array (or tensor) -> weak reference to the GatheredBatch whose items
# view it. Weak, so a batch nobody holds frees its arrays; the entry goes with it.
_GATHERED: dict[int, weakref.ref] = {}


def _register_rows(batch: GatheredBatch, base: Any, rows: list) -> None:
    """Record that ``rows`` (in this order) are all the rows of ``base``."""
    key = id(base)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _GATHERED.get(key) is ref:
            del _GATHERED[key]

    batch.rows_of[key] = rows
    _GATHERED[key] = weakref.ref(batch, forget)


def _joined(elements: Sequence[Any], base: Any) -> bool:
    """Return True if ``elements`` are the rows of gathered ``base``, each once, in order.

    The check is by identity against the views ``gather`` made, so a reordered, partial
    or mixed list, or arrays derived from the rows, never qualify. ``base`` is handed
    out at most once: collating the same items again stacks a fresh copy.
    """
    ref = _GATHERED.get(id(base))
    owner = None if ref is None else ref()
    rows = None if owner is None else owner.rows_of.get(id(base))
    if rows is None or len(rows) != len(elements) or not all(map(is_, elements, rows)):
        return False
    del owner.rows_of[id(base)]
    return True


def _wrap_stock_collate(kind: type, base_of: Callable[[Any], Any]) -> None:
    """Put a joined-rows fast path in front of torch's collate function for ``kind``."""
    stock = default_collate_fn_map[kind]
    if getattr(stock, "_raycache_stock", None) is not None:
        return  # wrapped already (the module was reloaded)

    def collate_rows(batch: Sequence[Any], *, collate_fn_map: dict | None = None) -> Any:
        base = base_of(batch[0])
        if base is not None and _joined(batch, base):
            return torch.from_numpy(base) if isinstance(base, np.ndarray) else base
        return stock(batch, collate_fn_map=collate_fn_map)

    collate_rows._raycache_stock = stock
    default_collate_fn_map[kind] = collate_rows


def _numpy_base(row: np.ndarray) -> np.ndarray | None:
    base = row.base
    return base if type(base) is np.ndarray and _tensor_ok(base.dtype) else None


_wrap_stock_collate(np.ndarray, _numpy_base)
_wrap_stock_collate(torch.Tensor, attrgetter("_base"))


def _column_kind(column: Any) -> tuple:
    if isinstance(column, _Stacked):
        kind = "tensor" if column.tensor else "array"
        return (kind, column.data.dtype, column.data.shape[1:])
    if isinstance(column, _Numbers):
        return ("numbers", column.data.dtype, ())
    return ("list",)


def _layout(chunk: Chunk) -> tuple:
    """Return ``(layout_id, template, kinds, sources, spans)`` for a chunk, computed once.

    ``kinds`` has one entry per column; chunks with the same ``layout_id`` have the same
    template and kinds and can be gathered from together. ``sources`` holds the numpy
    array to index for each array column and the column itself for the others;
    ``spans`` where each array column's rows lie, for ``copy_rows`` (None where they
    cannot be copied as bytes, and for the other columns). A
    mapped chunk is immutable (its arrays are read-only views of shared memory), so the
    answer never goes stale.
    """
    layout = getattr(chunk, _LAYOUT_ATTR, None)
    if layout is None:
        kinds = tuple(_column_kind(c) for c in chunk.columns)
        sources = tuple(c if kind[0] == "list" else c.data for c, kind in zip(chunk.columns, kinds))
        spans = tuple(
            row_span(src) if kind[0] in _COPY_KINDS else None for src, kind in zip(sources, kinds)
        )
        layout_id = _LAYOUT_IDS.setdefault((chunk.template, kinds), len(_LAYOUT_IDS))
        layout = (layout_id, chunk.template, kinds, sources, spans)
        setattr(chunk, _LAYOUT_ATTR, layout)
    return layout


def _layouts(chunks: Iterable[Chunk]) -> list:
    """Return each chunk's layout; the common case (all known) is one C-level pass."""
    chunks = list(chunks)
    try:
        return list(map(_known_layout, chunks))
    except AttributeError:
        return [_layout(c) for c in chunks]


def _row_values(sources: Sequence[Any], rows: Sequence[int]) -> list:
    """Return copies of one non-array column's values, one source column per row."""
    return [src.row(r, True) for src, r in zip(sources, rows)]


def _copies_rows(kind: tuple, count: int) -> bool:
    """Return True if ``count`` rows of a column of ``kind`` are worth ``copy_rows``.

    Only with more than one torch thread: on one, ``copy_rows`` was slower than the
    row-by-row copy (500 against 442 us for 64 rows of 48 KiB).
    """
    return (
        kind[0] in _COPY_KINDS
        and count * kind[1].itemsize * math.prod(kind[2]) >= COPY_ROWS_MIN_BYTES
        and torch.get_num_threads() > 1
    )


def _take_single(kind: tuple, source: Any, rows: np.ndarray, span: Any = None) -> tuple:
    """Gather one column when every row comes from the same chunk."""
    if kind[0] == "list":
        return ("list", [source.row(r, True) for r in rows.tolist()])
    if span is not None and _copies_rows(kind, len(rows)):
        return (kind[0], copy_rows([source], [span], np.zeros(len(rows), dtype=np.intp), rows))
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
    if kind[0] == "numbers":
        # .item() gives the Python number without a numpy scalar in between.
        return ("numbers", np.array(list(map(np.ndarray.item, sources, rows)), dtype=kind[1]))
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


def _groups(cids: np.ndarray) -> list[np.ndarray]:
    """Positions in the batch, split into one group per chunk."""
    order = np.argsort(cids, kind="stable")
    ordered = cids[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    return np.split(order, cuts)


def _row_bytes(source: np.ndarray) -> int:
    return source.itemsize * math.prod(source.shape[1:])


def _take_uniform(
    kinds: tuple, sources_of: dict, cids: np.ndarray, rows: np.ndarray, spans_of: dict | None = None
) -> list:
    """Gather a batch whose chunks all have the same column kinds.

    ``sources_of`` maps each chunk id to its per-column sources and ``spans_of`` to
    their row spans (see ``_layout``). An array column whose rows every chunk holds as
    plain bytes is copied with one ``copy_rows`` call over all the chunks, when the
    column's batch is big enough (``COPY_ROWS_MIN_BYTES``). Otherwise,
    one chunk: one fancy index per column. Several: rows are copied one by one (one
    copy, a Python step per row), except that small rows of chunks that each hold many
    rows of the batch are gathered per chunk (no Python step per row, but a second copy).
    """
    if len(sources_of) == 1:
        sources = next(iter(sources_of.values()))
        spans = (None,) * len(kinds) if spans_of is None else next(iter(spans_of.values()))
        return [_take_single(k, src, rows, sp) for k, src, sp in zip(kinds, sources, spans)]
    per_row = list(map(sources_of.__getitem__, cids.tolist()))
    row_list = rows.tolist()
    groups = _groups(cids) if len(rows) >= GROUP_MIN_ROWS * len(sources_of) else None
    positions = None
    out = []
    for j, kind in enumerate(kinds):
        if (
            spans_of is not None
            and _copies_rows(kind, len(rows))
            and all(spans[j] is not None for spans in spans_of.values())
        ):
            if positions is None:
                positions = _positions(sources_of, cids)
            keys, which = positions
            sources = [sources_of[c][j] for c in keys]
            out.append((kind[0], copy_rows(sources, [spans_of[c][j] for c in keys], which, rows)))
            continue
        sources = list(map(itemgetter(j), per_row))
        if groups is not None and kind[0] != "list" and _row_bytes(sources[0]) <= GROUP_MAX_BYTES:
            out.append(_column_grouped(kind, j, groups, sources_of, cids, rows))
        else:
            out.append(_column_rows(kind, sources, row_list))
    return out


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


def _leaf_values(kind: str, values: Any, batch: GatheredBatch | None = None) -> Any:
    """One value per item for a gathered leaf (views of the gathered array).

    With ``batch``, array and tensor rows are registered so that ``default_collate``
    can return the gathered array instead of stacking the rows again.
    """
    if kind == "array":
        if values.ndim > 1:
            rows = list(values)
        else:
            rows = [values[p, ...] for p in range(len(values))]  # 0-d arrays, not scalars
        if batch is not None:
            _register_rows(batch, values, rows)
        return rows
    if kind == "tensor":
        base = torch.from_numpy(values)
        rows = list(base.unbind(0))
        if batch is not None:
            _register_rows(batch, base, rows)
        return rows
    if kind == "numbers":
        return values.tolist()
    return values


def _dict_maker(keys: tuple) -> Callable[[list], list]:
    """Return ``make(parts) -> [dict, ...]`` building one dict per zipped row of parts.

    A dict display with the keys bound as names builds a small dict about 4x faster
    than ``dict(zip(keys, values))``, which is most of the per-item cost of a batch of
    small items. The source only ever holds generated names, never the keys.
    """
    tag = tuple((type(k), k) for k in keys)
    make = _DICT_MAKERS.get(tag)
    if make is None:
        names = [f"k{i}" for i in range(len(keys))]
        values = [f"v{i}" for i in range(len(keys))]
        display = ", ".join(f"{k}: {v}" for k, v in zip(names, values))
        source = f"lambda parts: [{{{display}}} for ({', '.join(values)},) in zip(*parts)]"
        make = eval(source, dict(zip(names, keys)))  # noqa: S307 - generated names only
        _DICT_MAKERS[tag] = make
    return make


def _assemble(template: Any, leaves: Iterator[Any], n: int) -> list:
    """Build ``n`` items from per-leaf value lists, one container level at a time."""
    if template == _LEAF:
        return next(leaves)
    kind = template[0]
    children = template[2] if kind == "d" else template[1]
    parts = [_assemble(t, leaves, n) for t in children]
    if not parts:
        return [{} if kind == "d" else [] if kind == "l" else () for _ in range(n)]
    if kind == "d":
        return _dict_maker(template[1])(parts)
    return list(map(list, zip(*parts))) if kind == "l" else list(zip(*parts))


def gather(chunks: dict[int, Chunk], loc: np.ndarray) -> list:
    """Build the items at ``loc`` (``raycache.protocol`` locations) from mapped chunks.

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
    cids = chunk_ids(loc)
    rows = location_rows(loc)
    layouts = dict(zip(chunks, _layouts(chunks.values())))
    first = next(iter(layouts.values()))
    template = first[1]
    uniform = len(set(map(itemgetter(0), layouts.values()))) == 1
    if template is None or not (uniform or all(lay[1] == template for lay in layouts.values())):
        # Items of different structures: no shared columns to gather from.
        return [chunks[c].row(r) for c, r in zip(cids.tolist(), rows.tolist())]
    if uniform:
        sources_of = dict(zip(layouts, map(itemgetter(3), layouts.values())))
        spans_of = None
        if any(_copies_rows(kind, len(loc)) for kind in first[2]):
            spans_of = dict(zip(layouts, map(itemgetter(4), layouts.values())))
        columns = _take_uniform(first[2], sources_of, cids, rows, spans_of)
    else:
        columns = _take_mixed(chunks, layouts, cids, rows)
    batch = GatheredBatch()
    batch.rows_of = {}
    batch.template = template
    batch.columns = columns
    batch._unbuilt = len(loc)
    return batch


def _tensor_ok(dtype: np.dtype) -> bool:
    """Return True if torch has a dtype for ``dtype`` (not str, bytes or void)."""
    return dtype.kind not in "USVO"


def _array_tensor(value: Any) -> Any:
    """Return a tensor copy of a numpy array torch can hold, else the value itself."""
    if isinstance(value, np.ndarray) and _tensor_ok(value.dtype):
        return torch.from_numpy(np.array(value))
    return value


def _collate_values(values: list) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {k: _collate_values([v[k] for v in values]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_collate_values(list(group)) for group in zip(*values)]
    if isinstance(first, np.ndarray):
        if all(isinstance(v, np.ndarray) and v.shape == first.shape for v in values):
            stacked = np.stack(values)
            if _tensor_ok(stacked.dtype):
                return torch.from_numpy(stacked)
        return [_array_tensor(v) for v in values]
    if isinstance(first, torch.Tensor):
        if all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
            return torch.stack(values)
        return list(values)
    if isinstance(first, (bool, int, float)) and all(type(v) is type(first) for v in values):
        try:
            return torch.tensor(values, dtype=torch.float64 if type(first) is float else None)
        except (OverflowError, RuntimeError, ValueError):  # ints beyond int64
            return list(values)
    if isinstance(first, np.generic) and all(type(v) is type(first) for v in values):
        array = np.array(values)
        return torch.from_numpy(array) if _tensor_ok(array.dtype) else list(values)
    return list(values)


def _collate_gathered(template: Any, columns: Iterator[tuple]) -> Any:
    if template == _LEAF:
        kind, values = next(columns)
        if kind in _ARRAY_KINDS:
            if _tensor_ok(values.dtype):
                return torch.from_numpy(values)
            return _leaf_values(kind, values)
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
        batch.rows_of = {}  # these arrays are handed out now: default_collate must copy
        batch._handed_out = True
        return _collate_gathered(batch.template, iter(batch.columns))
    if not len(batch):
        return []
    return _collate_values(list(batch))
