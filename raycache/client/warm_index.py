"""Per item index, where each field's row lies: a warm batch as one take per field.

A warm batch of small items costs more in per-batch Python than in copies: looking up
its locations, the chunks they name, those chunks' layouts and the span table's entries
(``raycache.batch.gather``) takes ~40 us for a batch of 64 1 KiB items whose copy takes
~10. While this process's map does not change (a warm epoch), every batch works out the
same answers for the same indices, so ``WarmIndex`` works them out once, for every
cached index: per column, the word in the column's span (``raycache.span_table``) where
the index's row starts. A batch is then one fancy index of that table and one of the
span per column.

Guarantees:

- An index is used only while the map is as it was built from (``LocalMap.changes``):
  any change to the locations or the mapped chunks sends batches the usual way until the
  map has held still again for long enough to pay for a new one (``WarmReads``).
- It holds the chunks it points into, so their memory stays mapped while a batch copies
  from them, even if another thread drops them from the map meanwhile; a stale index is
  dropped at the next batch, so it keeps no chunk the map has dropped for longer.
- An index not cached, in a chunk not mapped, or in a chunk of another layout than the
  most common one has no entry: a batch holding one is read the usual way. Every entry is
  a row inside its chunk (checked when the index is built).
- A field whose values are not plain bytes is served through the index only if every
  value is immutable (``str``, Python or numpy numbers, ``bytes``, ``None``), handed out
  as it is, as the usual way does; ragged arrays and the like leave no index.
- It is built only when its tables hold at most ``MAX_ENTRIES`` entries (items x fields),
  so a process never holds more than 32 MiB of them where every entry is a 4-byte word,
  64 MiB where they are 8-byte words or references to values.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from raycache.batch import chunk_groups, layouts_of, take_single
from raycache.client.local_map import LocalMap
from raycache.columns import ObjectColumn
from raycache.gathered import GatheredBatch
from raycache.protocol import ROW_BITS, ROW_MASK
from raycache.span_copy import row_span
from raycache.span_table import describe
from raycache.values import IMMUTABLE_LEAVES

__all__ = ["MAX_ENTRIES", "MIN_STEADY", "STEADY_BUILDS", "WarmIndex", "WarmReads"]

# Most entries an index holds (items x fields).
MAX_ENTRIES = 1 << 23
# Batches, all cached, the map must hold still for before an index is built (a filling
# epoch's map may hold still too, between sync replies), and how many times the last
# build's time it must hold still for: a map that changes as often as it may then spends
# at most a tenth of its time building indices.
MIN_STEADY = 8
STEADY_BUILDS = 10


class WarmIndex:
    """Every cached index's row, per field, as a word of the field's span (or its value).

    Built by ``WarmIndex.build``; ``changes`` is the map's count it was built at.
    """

    def __init__(
        self,
        changes: int,
        chunks: dict,
        template: object,
        kinds: tuple,
        spans: tuple,
        tables: list[np.ndarray],
        check: int,
    ):
        self.changes = changes
        self._chunks = chunks  # held: their memory stays mapped while the index is used
        self._template = template
        self._check = check  # a column with a span: a word of -1 there means no entry
        # Per field: kind, span (None for values), its row_span (the span is one source
        # whose rows start at every word), table.
        self._columns = [
            (kind, span, None if span is None else row_span(span), table)
            for kind, span, table in zip(kinds, spans, tables)
        ]

    @classmethod
    def build(cls, local_map: LocalMap) -> WarmIndex | None:
        """Return the index of ``local_map`` as it is now, or None where none can serve.

        Parameters
        ----------
        local_map : LocalMap
            The process's map and mapped chunks.

        Returns
        -------
        WarmIndex or None
            None if no chunk is mapped, a field is neither plain bytes nor immutable
            values (ragged arrays, say), the tables would exceed ``MAX_ENTRIES`` entries,
            or the map changed while the index was being built.
        """
        changes = local_map.changes
        chunks = dict(local_map.views)
        loc = local_map.loc
        if not chunks:
            return None
        layouts = dict(zip(chunks, layouts_of(chunks.values())))
        layout_id = Counter(lay[0] for lay in layouts.values()).most_common(1)[0][0]
        layouts = {c: lay for c, lay in layouts.items() if lay[0] == layout_id}
        template, kinds = next(iter(layouts.values()))[1:3]
        if template is None or len(loc) * len(kinds) > MAX_ENTRIES:
            return None
        state = describe(layouts)
        spanned = [j for j, span in enumerate(state.columns) if span is not None]
        if not spanned:
            return None
        valid = loc >= 0
        cids = np.where(valid, loc >> ROW_BITS, 0)
        valid &= cids < len(state.count)
        cids[~valid] = 0
        rows = loc & ROW_MASK
        valid &= rows < state.count[cids]  # 0 for chunks not described: no entry
        tables: list = []
        for j, kind in enumerate(kinds):
            span = state.columns[j]
            if span is not None:
                word = np.where(valid, state.start[j][cids] + rows * state.stride[j][cids], -1)
                tables.append(word.astype(np.int32) if len(span) < 2**31 else word)
                continue
            values = _values(j, chunks, valid, cids, rows) if kind[0] == "list" else None
            if values is None:
                return None
            tables.append(values)
        if local_map.changes != changes:
            return None
        return cls(changes, chunks, template, kinds, state.columns, tables, spanned[0])

    def batch(self, idx: np.ndarray) -> GatheredBatch | None:
        """Return the items at ``idx`` (validated indices), or None if one has no entry.

        Parameters
        ----------
        idx : numpy.ndarray
            Indices, in range.

        Returns
        -------
        GatheredBatch or None
            One private array per field, as ``raycache.batch.gather`` returns.
        """
        checked = self._columns[self._check][3][idx]
        if checked.min() < 0:
            return None
        columns = []
        for j, (kind, span, whole, table) in enumerate(self._columns):
            if span is None:  # immutable values, shared as they are
                columns.append(("list", table[idx].tolist()))
            else:
                starts = checked if j == self._check else table[idx]
                columns.append(take_single(kind, span, starts, whole))
        return GatheredBatch.of(self._template, columns, len(idx))


def _values(
    j: int, chunks: dict, valid: np.ndarray, cids: np.ndarray, rows: np.ndarray
) -> np.ndarray | None:
    """Return, per index, its value in column ``j`` of its chunk (an object array).

    None unless every such column is a list of immutable values (``str``, numbers,
    ``None``...): those are handed out as they are, where arrays would need a copy.
    """
    out = np.empty(len(valid), dtype=object)
    held = np.flatnonzero(valid)
    for group in chunk_groups(cids[held]) if len(held) else []:
        members = held[group]  # the indices held by one chunk
        column = chunks[int(cids[members[0]])].columns[j]
        if type(column) is not ObjectColumn or not all(map(_immutable, column.values)):
            return None
        values = np.empty(len(column.values), dtype=object)
        values[:] = column.values
        out[members] = values[rows[members]]
    return out


def _immutable(value: object) -> bool:
    return isinstance(value, IMMUTABLE_LEAVES) and not isinstance(value, np.void)


class WarmReads:
    """When to build a ``WarmIndex`` of ``local_map``, and the batches it serves.

    Parameters
    ----------
    local_map : LocalMap
        The process's map.
    """

    def __init__(self, local_map: LocalMap) -> None:
        self._map = local_map
        self._index: WarmIndex | None = None
        self._seen = -1  # the map's changes count the steady batches were counted at
        self._steady = 0  # batches all cached since the map last changed
        self._since = 0.0  # when this process saw that change
        self._build_s = 0.0  # what the last build took
        self._refused = -1  # changes count at which a build found no index possible

    def serves(self) -> bool:
        """Return True while the next batch is read through an index of the map as it is."""
        index = self._index
        return index is not None and index.changes == self._map.changes

    def batch(self, idx: np.ndarray) -> GatheredBatch | None:
        """Return the items at ``idx`` from the index, or None: read them the usual way.

        Parameters
        ----------
        idx : numpy.ndarray
            Validated indices.

        Returns
        -------
        GatheredBatch or None
            The batch, if the map has held still long enough and holds every index.
        """
        local_map = self._map
        changes = local_map.changes
        index = self._index
        if index is not None:
            if index.changes == changes:
                return index.batch(idx)
            self._index = None  # stale: let the chunks it holds go
        now = time.perf_counter()
        if changes != self._seen:
            self._seen, self._steady, self._since = changes, 0, now
            return None
        if local_map.loc[idx].min() >= 0:  # only batches it could serve lead to an index
            self._steady += 1
        if (
            changes == self._refused
            or self._steady < MIN_STEADY
            or now - self._since < STEADY_BUILDS * self._build_s
        ):
            return None
        index = self._index = WarmIndex.build(local_map)
        self._build_s = time.perf_counter() - now
        self._steady, self._since = 0, time.perf_counter()
        if index is None:
            self._refused = changes
            return None
        return index.batch(idx)
