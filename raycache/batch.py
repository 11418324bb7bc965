"""Reading a whole batch with one vectorised copy per field, and collating it.

torch calls ``Dataset.__getitems__`` for a batch and then the ``collate_fn``. The
items returned here are correct for the stock ``default_collate`` (each is a normal
item; its arrays are views into one private gathered array per field), and
``collate`` recognises a ``GatheredBatch`` and turns each gathered array into a
tensor without touching the items, which is where the speed comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raycache.chunk import Chunk, _build, _Numbers, _Stacked

__all__ = ["GatheredBatch", "collate", "gather"]

# Rows at least this large are copied one by one (a single copy each); smaller rows
# are gathered per chunk with fancy indexing (fewer Python steps, one extra copy).
ROW_LOOP_BYTES = 2048


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


def _gather_array(datas: dict[int, np.ndarray], cids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    first = datas[int(cids[0])]
    out = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
    if len(datas) == 1:
        np.take(first, rows, axis=0, out=out)
    elif out.itemsize * (out.size // max(1, len(rows))) >= ROW_LOOP_BYTES:
        for p, (c, r) in enumerate(zip(cids.tolist(), rows.tolist())):
            out[p] = datas[c][r]
    else:
        for c, data in datas.items():
            mask = cids == c
            out[mask] = data[rows[mask]]
    return out


def _column(chunks: dict[int, Chunk], j: int, cids: np.ndarray, rows: np.ndarray) -> tuple:
    cols = {c: chunk.columns[j] for c, chunk in chunks.items()}
    first = next(iter(cols.values()))
    kinds = {type(col) for col in cols.values()}
    if kinds == {_Stacked} and all(
        col.data.dtype == first.data.dtype
        and col.data.shape[1:] == first.data.shape[1:]
        and col.tensor == first.tensor
        for col in cols.values()
    ):
        out = _gather_array({c: col.data for c, col in cols.items()}, cids, rows)
        return ("tensor" if first.tensor else "array", out)
    if kinds == {_Numbers} and all(col.data.dtype == first.data.dtype for col in cols.values()):
        return ("numbers", _gather_array({c: col.data for c, col in cols.items()}, cids, rows))
    return ("list", [cols[c].row(r, True) for c, r in zip(cids.tolist(), rows.tolist())])


def _leaf_values(kind: str, values: Any) -> list:
    if kind == "array":
        return [values[p, ...] for p in range(len(values))]
    if kind == "tensor":
        tensor = torch.from_numpy(values)
        return [tensor[p, ...] for p in range(len(values))]
    if kind == "numbers":
        return values.tolist()
    return values


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
        item copies.
    """
    cids = loc >> 32
    rows = loc & 0xFFFFFFFF
    template = next(iter(chunks.values())).template
    same = template is not None and all(
        c.template == template and len(c.columns) == len(next(iter(chunks.values())).columns)
        for c in chunks.values()
    )
    if not same:
        return [chunks[c].row(r) for c, r in zip(cids.tolist(), rows.tolist())]
    columns = [_column(chunks, j, cids, rows) for j in range(len(next(iter(chunks.values())).columns))]
    leaves = [_leaf_values(kind, values) for kind, values in columns]
    batch = GatheredBatch(_build(template, iter(vals)) for vals in zip(*leaves))
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
        return torch.tensor(values)
    if isinstance(first, np.generic) and all(type(v) is type(first) for v in values):
        return torch.from_numpy(np.array(values))
    return list(values)


def _collate_gathered(template: Any, columns: Any) -> Any:
    if template == "*":
        kind, values = next(columns)
        if kind in ("array", "tensor", "numbers"):
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
    collated from its gathered arrays without a per-item step.

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
