"""What a cached item may contain, and how its size is counted.

An item is stored in the shared object store and read back by other processes, so
raycache accepts only values it can round-trip exactly and keep safe from writes:
numpy arrays (not of object dtype), CPU torch tensors, Python numbers, ``str``,
``bytes``, ``None``, numpy scalars, and dicts, lists and tuples of those. Anything
else is refused here, with the path of the offending field, before it reaches Ray.
"""

from __future__ import annotations

import numbers
import sys
from copy import copy as shallow_copy
from typing import Any

import numpy as np

__all__ = [
    "Position",
    "UnsupportedValueError",
    "check_item",
    "copy_item",
    "data_size",
    "field_path",
    "loaded_torch",
    "rebuilt",
]


def loaded_torch() -> Any:
    """Return torch if this process has imported it, else None.

    A value can only be a tensor in a process that has imported torch, so the checks
    never import it themselves: the Ray workers that only move numpy chunks (the
    directory actor, preload tasks) then do not pay torch's ~150 MB per process.

    Returns
    -------
    module or None
        The ``torch`` module, or None if this process has not imported it.
    """
    return sys.modules.get("torch")


# Immutable leaves are returned as they are; nothing a reader does can change them.
IMMUTABLE_LEAVES = (bool, int, float, complex, str, bytes, type(None), np.generic)


class UnsupportedValueError(RuntimeError):
    """An item holds a value raycache cannot cache (the seed raised RuntimeError too)."""


def field_path(path: tuple) -> str:
    """Render a field path such as ``("data", "image", 0)`` as ``data.image[0]``.

    Parameters
    ----------
    path : tuple
        Keys (dict levels) and integer positions (list and tuple levels).

    Returns
    -------
    str
        A readable path; ``<item>`` for the item itself.
    """
    out = ""
    for part in path:
        if isinstance(part, Position):
            out += f"[{int(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<item>"


class Position(int):
    """A list or tuple position inside a field path (prints as ``[i]``)."""


def copy_item(item: Any, path: tuple = ()) -> Any:
    """Validate an item and return a deep copy that shares no buffer with it.

    Parameters
    ----------
    item : Any
        The item to cache.
    path : tuple, optional
        Where ``item`` sits inside the enclosing item (for error messages).

    Returns
    -------
    Any
        A copy: arrays and tensors copied, containers rebuilt, immutable leaves shared.

    Raises
    ------
    UnsupportedValueError
        If a value has a type raycache does not cache; the message names its path.
    """
    return _walk(item, path, True)


def check_item(item: Any, path: tuple = ()) -> None:
    """Validate an item as ``copy_item`` does, without copying it.

    For items that are encoded into a chunk right away (the chunk copies every array it
    stores) and then dropped, as in a preload reader.

    Parameters
    ----------
    item : Any
        The item to cache.
    path : tuple, optional
        Where ``item`` sits inside the enclosing item (for error messages).

    Raises
    ------
    UnsupportedValueError
        If a value has a type raycache does not cache; the message names its path.
    """
    _walk(item, path, False)


def _walk(item: Any, path: tuple, copy: bool) -> Any:
    if isinstance(item, IMMUTABLE_LEAVES):
        return item
    if isinstance(item, np.ndarray):
        if type(item) is not np.ndarray and isinstance(item, (np.ma.MaskedArray, np.matrix)):
            raise UnsupportedValueError(
                f"cannot cache field {field_path(path)!r}: a {type(item).__module__}."
                f"{type(item).__qualname__} would come back as a plain array (its mask "
                "or matrix semantics lost); cache its data (and mask) as plain arrays"
            )
        _check_array(item.dtype, path)
        return np.array(item, copy=True, order="C") if copy else item
    torch = loaded_torch()
    if torch is not None and isinstance(item, torch.Tensor):
        _check_tensor(item, path)
        return item.detach().clone().contiguous() if copy else item
    if isinstance(item, dict):
        walked = {k: _walk(v, path + (k,), copy) for k, v in item.items()}
        return rebuilt(item, walked) if copy else item
    if isinstance(item, (list, tuple)):
        walked = [_walk(v, path + (Position(i),), copy) for i, v in enumerate(item)]
        return rebuilt(item, walked) if copy else item
    raise UnsupportedValueError(
        f"cannot cache field {field_path(path)!r} of type {type(item).__module__}."
        f"{type(item).__qualname__}: raycache caches numpy arrays, CPU torch tensors, "
        "numbers, str, bytes, None and dict/list/tuple of those"
    )


def rebuilt(container: Any, values: Any) -> Any:
    """Return a container of ``container``'s own type holding ``values`` instead.

    Parameters
    ----------
    container : dict, list or tuple
        The original, of the built-in type or a subclass (an ``OrderedDict``, a
        ``defaultdict``, a namedtuple, ``torch.Size``).
    values : dict or list
        The new contents: a dict with ``container``'s keys, or a list in its order.

    Returns
    -------
    Any
        For a built-in type the plain container of ``values``; for a subclass, a
        shallow copy of ``container`` (its type and state: a ``defaultdict``'s factory)
        with ``values`` put in, or for a tuple subclass, one built from them.
    """
    kind = type(container)
    if kind is dict or kind is list:
        return values
    if kind is tuple:
        return tuple(values)
    if isinstance(container, tuple):
        make = getattr(kind, "_make", None)  # a namedtuple
        return make(values) if make is not None else kind(values)
    new = shallow_copy(container)
    if isinstance(container, dict):
        for key, value in values.items():
            new[key] = value
    else:
        new[:] = values
    return new


def _check_array(dtype: np.dtype, path: tuple) -> None:
    if dtype.hasobject:
        raise UnsupportedValueError(
            f"cannot cache field {field_path(path)!r}: numpy arrays of dtype {dtype} hold "
            "Python objects; convert them to a numeric, bool, str or bytes dtype"
        )


def _check_tensor(tensor: Any, path: tuple) -> None:
    if tensor.device.type != "cpu":
        raise UnsupportedValueError(
            f"cannot cache field {field_path(path)!r}: tensor is on {tensor.device}; "
            "cache CPU data and move batches to the device after loading"
        )
    if tensor.is_sparse or tensor.layout != loaded_torch().strided:
        raise UnsupportedValueError(
            f"cannot cache field {field_path(path)!r}: only dense (strided) tensors are cached"
        )
    try:
        np.dtype(str(tensor.dtype).replace("torch.", ""))
    except TypeError:
        raise UnsupportedValueError(
            f"cannot cache field {field_path(path)!r}: tensor dtype {tensor.dtype} has no "
            "numpy equivalent; cast it (for example to float32) before caching"
        ) from None


def data_size(data: Any, seen: set[int] | None = None) -> int:
    """Count the bytes an item occupies, each numpy buffer once.

    Arrays that are views of the same base buffer count that buffer once, as in
    Hyrax's ``DataCache._data_size``; Python objects count ``sys.getsizeof``.

    Parameters
    ----------
    data : Any
        The item.
    seen : set of int, optional
        ids of objects already counted (shared between recursive calls).

    Returns
    -------
    int
        The size in bytes.

    Raises
    ------
    UnsupportedValueError
        For a value raycache does not cache.
    """
    if seen is None:
        seen = set()
    if id(data) in seen:
        return 0
    seen.add(id(data))
    if isinstance(data, np.ndarray):
        return _array_size(data, seen)
    torch = loaded_torch()
    if torch is not None and isinstance(data, torch.Tensor):
        return _tensor_size(data, seen)
    if isinstance(data, dict):
        return sys.getsizeof(data) + sum(
            data_size(k, seen) + data_size(v, seen) for k, v in data.items()
        )
    if isinstance(data, (list, tuple)):
        return sys.getsizeof(data) + sum(data_size(v, seen) for v in data)
    if isinstance(data, (numbers.Number, str, bytes, type(None), np.generic)):
        return sys.getsizeof(data)
    raise UnsupportedValueError(
        f"unsupported type for cache: {type(data).__module__}.{type(data).__qualname__}; "
        "raycache caches numpy arrays, CPU torch tensors, numbers, str, bytes, None "
        "and dict/list/tuple of those"
    )


def _array_size(data: np.ndarray, seen: set) -> int:
    """Count an array's buffer once per item, however many views of it the item holds."""
    root = data
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root is data or root.base is None:
        owner = root
    else:  # numpy array over a foreign buffer (bytes, mmap, torch storage)
        owner = root.base
    if owner is not data and id(owner) in seen:
        return sys.getsizeof(data) if data.base is not None else 0
    seen.add(id(owner))
    nbytes = root.nbytes if owner is root else getattr(owner, "nbytes", root.nbytes)
    return int(nbytes) + sys.getsizeof(data) - (0 if data.base is not None else data.nbytes)


def _tensor_size(data: Any, seen: set) -> int:
    """Count a tensor's storage once per item, however many tensors share it."""
    storage = data.untyped_storage()
    key = ("storage", storage.data_ptr())
    if key in seen:
        return sys.getsizeof(data)
    seen.add(key)
    return int(storage.nbytes()) + sys.getsizeof(data)
