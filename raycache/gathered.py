"""``GatheredBatch`` and ``collate``: a batch that is its own stacked tensors.

torch calls ``Dataset.__getitems__`` for a batch and then the ``collate_fn``. A batch
gathered by ``raycache.batch.gather`` holds one private array per field; its items
(a dict and a row view per item and field) are correct for the stock
``default_collate``, and ``collate`` recognises a ``GatheredBatch`` and turns each
gathered array into a tensor without touching the items, which is where the speed
comes from.

The stock ``default_collate`` would stack the rows again: a second copy of the batch.
torch dispatches it on the element type through ``default_collate_fn_map``, which it
documents as the way to extend it; raycache wraps the entries for numpy arrays and
tensors so that a list that is exactly the rows of one gathered array, in order, is
answered with that array (it already is the stacked batch). Anything else goes to
torch's own function, so other arrays collate as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter, is_
from typing import Any

import numpy as np

__all__ = ["GatheredBatch", "collate"]

_LEAF = "*"
_ARRAY_KINDS = ("array", "tensor", "numbers", "scalars")
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
        ``(kind, values)`` per leaf: ``"array"``, ``"tensor"``, ``"numbers"`` (Python
        numbers) and ``"scalars"`` (numpy scalars) hold one gathered numpy array;
        ``"list"`` holds one value per item.
    """

    template: Any = None
    columns: list = []
    # id(base) -> the row views handed out in the items, for ``default_collate``.
    rows_of: dict = {}
    _unbuilt = 0  # items still to build from the columns
    _handed_out = False  # ``collate`` gave the arrays away: items must not offer them

    @classmethod
    def of(cls, template: Any, columns: list, count: int) -> GatheredBatch:
        """Return a batch of ``count`` items of ``template`` over gathered ``columns``.

        Parameters
        ----------
        template : Any
            The items' shared structure (``raycache.chunk`` templates).
        columns : list of tuple
            ``(kind, values)`` per leaf, as the ``columns`` attribute.
        count : int
            Number of items.

        Returns
        -------
        GatheredBatch
            The batch; its items are built on first use as a list.
        """
        batch = cls()
        batch.rows_of = {}
        batch.template = template
        batch.columns = columns
        batch._unbuilt = count
        return batch

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
_stock_collate_wrapped = False  # torch's stock collate knows gathered rows


def _register_rows(batch: GatheredBatch, base: Any, rows: list) -> None:
    """Record that ``rows`` (in this order) are all the rows of ``base``."""
    key = id(base)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _GATHERED.get(key) is ref:
            del _GATHERED[key]

    if not _stock_collate_wrapped:
        _install_stock_collate()
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
    import torch
    from torch.utils.data._utils.collate import default_collate_fn_map

    stock = default_collate_fn_map[kind]
    if getattr(stock, "_raycache_stock", None) is not None:
        return  # wrapped already (the module was reloaded)

    def collate_rows(batch: Sequence[Any], *, collate_fn_map: dict | None = None) -> Any:
        base = base_of(batch[0])
        if base is not None and _joined(batch, base):
            return torch.from_numpy(_native(base)) if isinstance(base, np.ndarray) else base
        return stock(batch, collate_fn_map=collate_fn_map)

    collate_rows._raycache_stock = stock
    default_collate_fn_map[kind] = collate_rows


def _numpy_base(row: np.ndarray) -> np.ndarray | None:
    base = row.base
    return base if type(base) is np.ndarray and _tensor_ok(base.dtype) else None


def _install_stock_collate() -> None:
    """Wrap torch's stock collate for arrays and tensors, once per process.

    Done when the first gathered batch registers its rows (only then can the stock
    collate meet them), not on import: a process that never reads a batch (the
    ``raycache preload`` command, a Ray worker) does not import torch.
    """
    global _stock_collate_wrapped
    import torch

    _wrap_stock_collate(np.ndarray, _numpy_base)
    _wrap_stock_collate(torch.Tensor, attrgetter("_base"))
    _stock_collate_wrapped = True


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
        import torch

        base = torch.from_numpy(values)
        rows = list(base.unbind(0))
        if batch is not None:
            _register_rows(batch, base, rows)
        return rows
    if kind == "numbers":
        return values.tolist()
    if kind == "scalars":
        return list(values)  # numpy scalars of the column's dtype
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


def _tensor_ok(dtype: np.dtype) -> bool:
    """Return True if torch has a dtype for ``dtype`` (not str, bytes or void)."""
    return dtype.kind not in "USVO"


def _native(array: np.ndarray) -> np.ndarray:
    """Return ``array``, or a copy in this machine's byte order (torch has no other)."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _array_tensor(value: Any) -> Any:
    """Return a tensor copy of a numpy array torch can hold, else the value itself."""
    import torch

    if isinstance(value, np.ndarray) and _tensor_ok(value.dtype):
        return torch.from_numpy(_native(np.array(value)))
    return value


def _collate_values(values: list) -> Any:
    import torch

    first = values[0]
    if isinstance(first, dict):
        return {k: _collate_values([v[k] for v in values]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_collate_values(list(group)) for group in zip(*values)]
    if isinstance(first, np.ndarray):
        if all(isinstance(v, np.ndarray) and v.shape == first.shape for v in values):
            stacked = np.stack(values)
            if _tensor_ok(stacked.dtype):
                return torch.from_numpy(_native(stacked))
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
        return torch.from_numpy(_native(array)) if _tensor_ok(array.dtype) else list(values)
    return list(values)


def _collate_gathered(template: Any, columns: Iterator[tuple]) -> Any:
    import torch

    if template == _LEAF:
        kind, values = next(columns)
        if kind in _ARRAY_KINDS:
            if _tensor_ok(values.dtype):
                return torch.from_numpy(_native(values))
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
