"""Validating and buffering a batch of inserted items with one copy per field.

A trainer filling the cache on miss inserts the misses of each batch it reads. Done one
item at a time, every item is walked for validation (a path tuple built per field), then
copied row by row into the write buffer's columns under the buffer's lock: ~25 us of
Python per 48 KiB item, more than the provider read it follows when items are already
in memory. Here the first item of a batch is validated and flattened as a single insert
would be (``chunk.flatten_checked``); every later item whose containers, leaf types,
and array dtypes and shapes equal the first's is flattened without building paths (its
leaves are then valid by the first item's checks), and such a batch is copied with one
``np.stack`` per field (``WriteBuffer.add_many``).

Guarantees are those of ``CacheClient.put`` for each item: an item that does not match
the first is validated on its own, and a bad one raises ``UnsupportedValueError`` naming
its index and field path after the items before it have been buffered; an index already
cached or buffered keeps its first value (within a batch too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from raycache.chunk import flatten_checked, flatten_item
from raycache.values import IMMUTABLE_LEAVES, UnsupportedValueError, loaded_torch

__all__ = ["flatten_batch", "put_batch"]


def _leaf_kind(leaf: Any) -> tuple | None:
    """Return ``(type, facts)``: what a later leaf must equal to share this leaf's checks.

    ``facts`` is None for an immutable leaf (its type says it all), else the array's
    or tensor's ``_facts``. None for leaves checked one by one (a namedtuple kept
    whole, a subclass of an array or tensor).
    """
    kind = type(leaf)
    if isinstance(leaf, IMMUTABLE_LEAVES):
        return (kind, None)
    torch = loaded_torch()
    if kind is np.ndarray or (torch is not None and kind is torch.Tensor):
        return (kind, _facts(leaf))
    return None


def _facts(leaf: Any) -> tuple:
    """Dtype and shape of an array; also device and layout of a tensor."""
    if type(leaf) is np.ndarray:
        return (leaf.dtype, leaf.shape)
    return (leaf.dtype, leaf.shape, leaf.device, leaf.layout)


def _same_kinds(leaves: list, kinds: list) -> bool:
    """Return True if every leaf has the type (and dtype, shape...) of the first item's."""
    if len(leaves) != len(kinds):
        return False
    for leaf, (kind, facts) in zip(leaves, kinds):
        if type(leaf) is not kind:
            return False
        if facts is None:
            continue
        if kind is np.ndarray:  # the common case, without building a tuple
            dtype = leaf.dtype
            if (dtype is not facts[0] and dtype != facts[0]) or leaf.shape != facts[1]:
                return False
        elif _facts(leaf) != facts:
            return False
    return True


def _flat_keys(template: Any) -> tuple | None:
    """Return the keys of a template that is a dict of leaves keyed by str, else None.

    Keys of other types are compared by ``flatten_item``'s template, which tells ``1``
    from ``True`` (equal as keys, so ``tuple(item) == keys`` would not).
    """
    if template[0] == "d" and len(template) == 3 and all(type(p) is str for p in template[2]):
        return template[1]
    return None


def _leaves_of(item: Any, template: Any, keys: tuple | None) -> list | None:
    """Return ``item``'s leaves if it is laid out as ``template``, else None."""
    if keys is not None and type(item) is dict and tuple(item) == keys:
        return list(item.values())  # a dict of leaves: no walk at all
    leaves: list = []
    return leaves if flatten_item(item, leaves) == template else None


def flatten_batch(
    indices: Sequence[int], items: Sequence[Any]
) -> tuple[list[tuple], bool, UnsupportedValueError | None]:
    """Validate and flatten a batch of items; stop at the first bad one.

    Parameters
    ----------
    indices : Sequence[int]
        The items' provider indices (for error messages).
    items : Sequence[Any]
        The items.

    Returns
    -------
    tuple
        ``(flats, uniform, error)``: each valid item's ``(template, leaves)`` (see
        ``chunk.flatten_checked``) up to the first bad item; whether all of them share
        the first item's template, leaf types, and array dtypes and shapes; and the
        error for the first bad item (None if every item is valid).
    """
    flats: list[tuple] = []
    template, kinds, keys = None, None, None
    uniform = True
    for idx, item in zip(indices, items):
        if kinds is not None:
            # ``flatten_item`` builds no field paths: for an item laid out as the first,
            # whose leaves passed the checks, this is all the validation it needs.
            leaves = _leaves_of(item, template, keys)
            if leaves is not None and _same_kinds(leaves, kinds):
                flats.append((template, leaves))
                continue
        leaves: list = []
        try:
            own = flatten_checked(item, leaves)
        except UnsupportedValueError as exc:
            return flats, uniform, UnsupportedValueError(f"item {idx}: {exc}")
        flats.append((own, leaves))
        if template is None:
            found = [_leaf_kind(leaf) for leaf in leaves]
            template, kinds = own, (None if None in found else found)
            keys = _flat_keys(template) if type(template) is tuple else None
        else:
            uniform = False  # this item is laid out otherwise than the first
    return flats, uniform and kinds is not None, None


def put_batch(
    buffer: Any,
    loc: np.ndarray,
    indices: Sequence[int],
    items: Sequence[Any],
    skip: bool,
    send: Callable[[int, Any], None] | None = None,
) -> None:
    """Validate items and buffer those not cached yet (``CacheClient.put_many``).

    Parameters
    ----------
    buffer : WriteBuffer
        The client's write buffer.
    loc : numpy.ndarray
        The local map's locations (an index with a location ``>= 0`` is cached).
    indices : Sequence[int]
        Validated provider indices.
    items : Sequence[Any]
        The items, in the same order.
    skip : bool
        Validate only (the client is closed or its actor is gone).
    send : Callable[[int, Any], None], optional
        In a forked child: hands each item to the parent as it is (the parent
        validates and buffers it), instead of buffering here.

    Raises
    ------
    UnsupportedValueError
        For the first item holding a value raycache does not cache, naming its index
        and field path; the items before it are buffered.
    """
    if send is not None:
        for idx, item in zip(indices, items):
            send(idx, item)
        return
    flats, uniform, error = flatten_batch(indices, items)
    if not skip and flats:
        idx = np.asarray(indices[: len(flats)], dtype=np.int64)
        fresh = np.flatnonzero(loc[idx] < 0).tolist()
        if len(fresh) == len(flats):
            buffer.add_many(idx.tolist(), items[: len(flats)], flats, uniform)
        elif fresh:
            picked = [items[p] for p in fresh]
            buffer.add_many(idx[fresh].tolist(), picked, [flats[p] for p in fresh], uniform)
    if error is not None:
        raise error
