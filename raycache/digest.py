"""Digests of object graphs that are equal in every process that builds the same value.

A cache identity is compared between processes that never share memory, so the digest
of a value must depend on the value only. This module guarantees:

- **No module names.** A class defined in a script is ``__main__.P`` there,
  ``__mp_main__.P`` in a spawned DataLoader worker and ``script.P`` where the script is
  imported; classes and functions enter the digest by ``__qualname__`` (and functions by
  their code, without file names or line numbers), never by ``__module__``.
- **Process independence.** No ``repr`` with a memory address, no ``hash()`` (salted per
  process), no set or dict iteration order: mappings and sets are digested as the sorted
  digests of their entries.
- **The left-out rule** of :mod:`raycache.identity_rules` applies to every attribute and
  mapping entry met on the way, at any depth.
- **Bounded cost.** Arrays over ``_WHOLE_ARRAY_BYTES`` are digested by shape, dtype and
  evenly spaced blocks; shared objects are digested once per :class:`Digester`; cycles
  and nesting deeper than ``MAX_DEPTH`` end the descent.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from raycache.identity_rules import (
    instance_fields,
    is_hyrax_config,
    items_view,
    kept_attributes,
)

__all__ = ["MAX_DEPTH", "Digester", "stable_digest"]

MAX_DEPTH = 64
# Arrays up to this size are digested whole; larger ones by shape, dtype and evenly
# spaced blocks, so naming a cache over a provider that holds gigabytes stays fast.
_WHOLE_ARRAY_BYTES = 64 << 20
_SAMPLE_BLOCKS = 1024
_SAMPLE_BLOCK_BYTES = 4096
_FIELDS_MARK = b"<fields>"


def _scalar(obj: Any) -> bytes | None:
    """Return a self-delimiting encoding of a scalar, or None if ``obj`` is not one."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str)):
        text = f"{type(obj).__name__}:{obj!r}".encode()
    elif isinstance(obj, bytes):
        text = b"bytes:" + obj
    elif isinstance(obj, np.generic) and not isinstance(obj, np.void):
        text = f"{type(obj).__name__}:{obj.item()!r}".encode()
    else:
        return None
    return len(text).to_bytes(8, "little") + text


def _is_tensor(obj: Any) -> bool:
    # torch is looked up, not imported: only a process that already uses it has tensors.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


class Digester:
    """Digests object graphs; one instance per identity, so shared objects are digested once.

    Attributes
    ----------
    opaque : set of str
        Classes whose values could only contribute their class name.
    too_deep : bool
        True once a value nested deeper than ``MAX_DEPTH`` was cut off.
    """

    def __init__(self) -> None:
        self._memo: dict[int, bytes] = {}
        self._keep: list[Any] = []  # memoised objects stay alive: their ids are not reused
        self._active: set[int] = set()
        self.opaque: set[str] = set()
        self.too_deep = False

    def enclose(self, obj: Any) -> None:
        """Treat ``obj`` as being digested: references back to it digest as cycles.

        Parameters
        ----------
        obj : Any
            The root whose fields the caller digests one by one (a provider).
        """
        self._active.add(id(obj))

    def digest(self, obj: Any, depth: int = 0) -> bytes:
        """Return the 32-byte digest of ``obj``.

        Parameters
        ----------
        obj : Any
            Any value.
        depth : int, optional
            Nesting depth of ``obj`` below the value first asked for.

        Returns
        -------
        bytes
            A SHA-256 digest.
        """
        raw = _scalar(obj)
        if raw is not None:
            return hashlib.sha256(raw).digest()
        key = id(obj)
        if key in self._memo:
            return self._memo[key]
        if key in self._active:
            # A reference back to an object being digested (a bound method of the
            # provider, a parent link): its content is already on the way in.
            return hashlib.sha256(b"<cycle>" + type(obj).__qualname__.encode()).digest()
        if depth > MAX_DEPTH:
            self.too_deep = True
            return hashlib.sha256(b"<too deep>").digest()
        self._active.add(key)
        try:
            h = hashlib.sha256(f"<{type(obj).__qualname__}>".encode())
            self._feed(h, obj, depth)
            out = h.digest()
        finally:
            self._active.discard(key)
        self._memo[key] = out
        self._keep.append(obj)
        return out

    def _part(self, h: Any, obj: Any, depth: int) -> None:
        raw = _scalar(obj)
        h.update(raw if raw is not None else self.digest(obj, depth + 1))

    def _unordered(self, h: Any, digests: list[bytes]) -> None:
        h.update(len(digests).to_bytes(8, "little"))
        for d in sorted(digests):
            h.update(d)

    def _mapping(self, h: Any, obj: Mapping, depth: int) -> None:
        entries = []
        for k, v in kept_attributes(items_view(obj) if is_hyrax_config(obj) else obj).items():
            sub = hashlib.sha256()
            self._part(sub, k, depth)
            self._part(sub, v, depth)
            entries.append(sub.digest())
        self._unordered(h, entries)

    def _feed(self, h: Any, obj: Any, depth: int) -> None:
        if isinstance(obj, np.ndarray):
            self._array(h, obj, depth)
        elif _is_tensor(obj):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
            self._array(h, t.view(sys.modules["torch"].uint8).numpy(), depth)
        elif isinstance(obj, Mapping):
            self._mapping(h, obj, depth)
        elif isinstance(obj, (list, tuple)):
            h.update(len(obj).to_bytes(8, "little"))
            for v in obj:
                self._part(h, v, depth)
        elif isinstance(obj, (set, frozenset)):
            self._unordered(h, [self.digest(v, depth + 1) for v in obj])
        elif isinstance(obj, (enum.Enum, os.PathLike, type, io.IOBase)):
            self._named(h, obj, depth)
        elif isinstance(obj, (types.MethodType, types.FunctionType, types.CodeType)):
            self._callable(h, obj, depth)
        elif isinstance(obj, functools.partial):
            for v in (obj.func, obj.args, obj.keywords):
                self._part(h, v, depth)
        elif isinstance(obj, (types.BuiltinFunctionType, np.ufunc)):
            h.update(getattr(obj, "__qualname__", getattr(obj, "__name__", "")).encode())
        else:
            self._object(h, obj, depth)

    def _named(self, h: Any, obj: Any, depth: int) -> None:
        """Digest values identified by a name: enum members, paths, classes, open files."""
        if isinstance(obj, enum.Enum):
            h.update(f"{type(obj).__qualname__}.{obj.name}".encode())
        elif isinstance(obj, os.PathLike):
            self._part(h, os.fspath(obj), depth)
        elif isinstance(obj, type):
            h.update(obj.__qualname__.encode())
        else:
            # An open file is identified by what it reads: its path and mode.
            h.update(repr((getattr(obj, "name", None), getattr(obj, "mode", None))).encode())

    def _callable(self, h: Any, obj: Any, depth: int) -> None:
        if isinstance(obj, types.MethodType):
            self._part(h, obj.__func__, depth)
            self._part(h, obj.__self__, depth)
        elif isinstance(obj, types.FunctionType):
            self._function(h, obj, depth)
        else:
            self._code(h, obj, depth)

    def _function(self, h: Any, fn: types.FunctionType, depth: int) -> None:
        h.update(fn.__qualname__.encode())
        self._code(h, fn.__code__, depth)
        for v in (fn.__defaults__, fn.__kwdefaults__):
            self._part(h, v, depth)
        for cell in fn.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell: a closure variable not yet assigned
                content = None
            self._part(h, content, depth)

    def _code(self, h: Any, code: types.CodeType, depth: int) -> None:
        # File names and line numbers are left out: a notebook cell or a moved script
        # makes the same items.
        h.update(code.co_code)
        h.update(repr(code.co_names).encode())
        h.update(len(code.co_consts).to_bytes(8, "little"))
        for c in code.co_consts:
            self._part(h, c, depth)

    def _object(self, h: Any, obj: Any, depth: int) -> None:
        fields = instance_fields(obj)
        if fields is not None:
            h.update(_FIELDS_MARK)
            self._mapping(h, kept_attributes(fields), depth)
            return
        # No __dict__ or slots (C extension types: numpy Generators, pandas internals):
        # digest what pickling would keep, which is what the object is made of.
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception:
            reduced = None
        if isinstance(reduced, tuple) and len(reduced) >= 2:
            for v in reduced[1:3]:
                self._part(h, v, depth)
            return
        self.opaque.add(type(obj).__qualname__)

    def _array(self, h: Any, arr: np.ndarray, depth: int) -> None:
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        if arr.dtype.hasobject:
            for v in arr.reshape(-1):
                self._part(h, v, depth)
            return
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        if flat.nbytes <= _WHOLE_ARRAY_BYTES:
            h.update(flat)
            return
        step = flat.nbytes // _SAMPLE_BLOCKS
        for start in range(0, _SAMPLE_BLOCKS * step, step):
            h.update(flat[start : start + _SAMPLE_BLOCK_BYTES])
        h.update(flat[-_SAMPLE_BLOCK_BYTES:])


def stable_digest(obj: Any) -> str:
    """Return a hex digest of an object's value that is the same in every process.

    The rules (what is left out, how classes and functions count) are those of the
    module docstring and ``docs/identity.md``.

    Parameters
    ----------
    obj : Any
        Any object; objects of unknown classes contribute their class ``__qualname__``
        and their attributes.

    Returns
    -------
    str
        A SHA-256 hex digest.
    """
    return Digester().digest(obj).hex()
