"""Cache identity: a digest of what determines a provider's items, equal in every process.

Two processes that build the same provider over the same data must land on the same
cache, and two providers whose items differ must not. This module guarantees:

- **No module names.** A class defined in a script is ``__main__.P`` there,
  ``__mp_main__.P`` in a spawned DataLoader worker and ``script.P`` where the script is
  imported; classes and functions enter the digest by ``__qualname__`` (and functions by
  their code), never by ``__module__``.
- **Process independence.** No ``repr`` with a memory address, no ``hash()`` (salted per
  process), no set or dict iteration order: mappings and sets are digested as the sorted
  digests of their entries.
- **What determines items is kept; what does not is left out, by one rule**
  (``docs/identity.md``): the provider's own cache (anything with ``try_fetch`` and
  ``insert_into_cache``), process machinery (loggers, locks, threads, executors, queues,
  sockets), the names in ``LEFT_OUT_NAMES`` (sampler splits, DataLoader options) wherever
  they appear as an attribute or a mapping key, and, in a Hyrax config, the tables and
  ``data_set`` keys listed in ``HYRAX_LEFT_OUT_TABLES`` / ``HYRAX_LEFT_OUT_DATA_SET_KEYS``.
- **Providers may state their identity**: a ``cache_identity()`` method, or the
  ``raycache.identity`` config key, replaces the digest of the provider's state; the class
  ``__qualname__`` and the length still count.

The fingerprint the cache's actor compares is a readable line naming the class, the
length, a short digest and the per-field digests, so a mismatch message can say which
fields differ (:func:`mismatch_message`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import io
import logging
import os
import queue
import re
import socket
import sys
import threading
import types
import weakref
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np

__all__ = [
    "CacheIdentity",
    "HYRAX_LEFT_OUT_DATA_SET_KEYS",
    "HYRAX_LEFT_OUT_TABLES",
    "LEFT_OUT_NAMES",
    "derive_identity",
    "mismatch_message",
    "stable_digest",
]

logger = logging.getLogger(__name__)

# Attribute names and mapping keys that steer how items are sampled or batched, never
# what an item is: Hyrax's split_fraction/split_indices (applied by samplers) and the
# DataLoader's options. "shuffle" is not here: a provider may permute its own items.
LEFT_OUT_NAMES = frozenset(
    {
        "split_fraction",
        "split_indices",
        "batch_size",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "drop_last",
    }
)

# Tables of a Hyrax config that only the model, the training loop, inference, the
# vector database, the downloader or raycache itself read.
HYRAX_LEFT_OUT_TABLES = frozenset(
    {
        "model",
        "criterion",
        "optimizer",
        "scheduler",
        "train",
        "test",
        "infer",
        "onnx",
        "data_loader",
        "vector_db",
        "results",
        "umap",
        "visualize",
        "engine",
        "download",
        "raycache",
    }
)
# Hyrax's general table: only data_dir can say where items come from.
_HYRAX_GENERAL_KEPT = frozenset({"data_dir"})
# data_set keys Hyrax uses for the cache itself, for splits made by samplers
# (train/validate/test_size, and seed, which Hyrax uses only to shuffle splits and
# samplers) and for NaN handling, which Hyrax applies in collate, after the cache.
HYRAX_LEFT_OUT_DATA_SET_KEYS = frozenset(
    {
        "use_cache",
        "preload_cache",
        "preload_threads",
        "train_size",
        "validate_size",
        "test_size",
        "seed",
        "nan_mode",
        "nan_quantile",
    }
)

# Arrays up to this size are digested whole; larger ones by shape, dtype and evenly
# spaced blocks, so naming a cache over a provider that holds gigabytes stays fast.
_WHOLE_ARRAY_BYTES = 64 << 20
_SAMPLE_BLOCKS = 1024
_SAMPLE_BLOCK_BYTES = 4096
_MAX_DEPTH = 64
_FIELD_DIGEST_HEX = 8
_MAX_SHOWN_FIELDS = 24

_MACHINERY: tuple[type, ...] = (
    logging.Logger,
    logging.LoggerAdapter,
    logging.Handler,
    threading.Thread,
    threading.Event,
    threading.Condition,
    threading.Semaphore,
    type(threading.Lock()),
    type(threading.RLock()),
    Executor,
    queue.Queue,
    socket.socket,
    types.ModuleType,
    types.FrameType,
    types.GeneratorType,
)


def _is_cache(obj: Any) -> bool:
    """Return True for an object with Hyrax's cache interface (the provider's own cache)."""
    kind = type(obj)
    return callable(getattr(kind, "try_fetch", None)) and callable(
        getattr(kind, "insert_into_cache", None)
    )


def _left_out(value: Any) -> bool:
    return isinstance(value, _MACHINERY) or _is_cache(value)


def _is_hyrax_config(obj: Mapping) -> bool:
    return isinstance(obj.get("data_set"), Mapping) and (
        isinstance(obj.get("data_request"), Mapping) or isinstance(obj.get("general"), Mapping)
    )


def _hyrax_view(config: Mapping) -> dict:
    """Return the part of a Hyrax config that can change items."""
    out = {}
    for key, value in config.items():
        if not isinstance(key, str) or key in HYRAX_LEFT_OUT_TABLES:
            continue
        if key.startswith("torch.optim"):  # optimizer and scheduler parameter tables
            continue
        if key == "general" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k in _HYRAX_GENERAL_KEPT}
        elif key == "data_set" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in HYRAX_LEFT_OUT_DATA_SET_KEYS}
        out[key] = value
    return out


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


class _Digester:
    """Digests object graphs; one instance per identity, so shared objects are digested once."""

    def __init__(self) -> None:
        self._memo: dict[int, bytes] = {}
        self._keep: list[Any] = []  # memoised objects stay alive: their ids are not reused
        self._active: set[int] = set()
        self.opaque: set[str] = set()
        self.too_deep = False

    def digest(self, obj: Any, depth: int = 0) -> bytes:
        """Return the 32-byte digest of ``obj``."""
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
        if depth > _MAX_DEPTH:
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
        if _is_hyrax_config(obj):
            obj = _hyrax_view(obj)
        entries = []
        for k, v in obj.items():
            if (isinstance(k, str) and k in LEFT_OUT_NAMES) or _left_out(v):
                continue
            sub = hashlib.sha256()
            self._part(sub, k, depth)
            self._part(sub, v, depth)
            entries.append(sub.digest())
        self._unordered(h, entries)

    def _feed(self, h: Any, obj: Any, depth: int) -> None:
        if isinstance(obj, np.ndarray):
            _feed_array(h, obj, self, depth)
        elif _is_tensor(obj):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
            _feed_array(h, t.view(_torch().uint8).numpy(), self, depth)
        elif isinstance(obj, Mapping):
            self._mapping(h, obj, depth)
        elif isinstance(obj, (list, tuple)):
            h.update(len(obj).to_bytes(8, "little"))
            for v in obj:
                self._part(h, v, depth)
        elif isinstance(obj, (set, frozenset)):
            self._unordered(h, [self.digest(v, depth + 1) for v in obj])
        elif isinstance(obj, enum.Enum):
            h.update(f"{type(obj).__qualname__}.{obj.name}".encode())
        elif isinstance(obj, os.PathLike):
            self._part(h, os.fspath(obj), depth)
        elif isinstance(obj, type):
            h.update(obj.__qualname__.encode())
        elif isinstance(obj, types.MethodType):
            self._part(h, obj.__func__, depth)
            self._part(h, obj.__self__, depth)
        elif isinstance(obj, types.FunctionType):
            self._function(h, obj, depth)
        elif isinstance(obj, types.CodeType):
            self._code(h, obj, depth)
        elif isinstance(obj, functools.partial):
            for v in (obj.func, obj.args, obj.keywords):
                self._part(h, v, depth)
        elif isinstance(obj, (types.BuiltinFunctionType, np.ufunc)):
            h.update(getattr(obj, "__qualname__", getattr(obj, "__name__", "")).encode())
        elif isinstance(obj, io.IOBase):
            # An open file is identified by what it reads: its path and mode.
            h.update(repr((getattr(obj, "name", None), getattr(obj, "mode", None))).encode())
        else:
            self._object(h, obj, depth)

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
        state = getattr(obj, "__dict__", None)
        slots = {}
        for kind in type(obj).__mro__:
            for slot in getattr(kind, "__slots__", ()) or ():
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                    if hasattr(obj, slot):
                        slots[slot] = getattr(obj, slot)
        if isinstance(state, dict) or slots:
            fields = dict(slots)
            if isinstance(state, dict):
                fields.update(state)
            h.update(_FIELDS_MARK)
            self._mapping(h, _attributes(fields), depth)
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


_FIELDS_MARK = b"<fields>"


def _attributes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return an object's attributes less those left out by name or by kind."""
    return {
        k: v
        for k, v in state.items()
        if not (isinstance(k, str) and k in LEFT_OUT_NAMES) and not _left_out(v)
    }


def _torch() -> Any:
    return sys.modules["torch"]


def _is_tensor(obj: Any) -> bool:
    # torch is imported only if the process already uses it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _feed_array(h: Any, arr: np.ndarray, digester: _Digester, depth: int) -> None:
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    if arr.dtype.hasobject:
        for v in arr.reshape(-1):
            digester._part(h, v, depth)
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
    return _Digester().digest(obj).hex()


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What a cache is of: a provider's class, length and the digest of what makes its items.

    Parameters
    ----------
    qualname : str
        The provider class's ``__qualname__`` (no module).
    length : int
        ``len(provider)``.
    digest : str
        SHA-256 hex digest of qualname, length, source and every field.
    source : str
        ``"state"`` (derived), ``"cache_identity()"`` or ``"raycache.identity"``.
    fields : tuple of (str, str)
        Each field that went into the digest and its hex digest, by name.
    left_out : tuple of str
        Attributes of the provider left out by the rule.
    opaque : tuple of str
        Classes of values that could only contribute their class name.
    """

    qualname: str
    length: int
    digest: str
    source: str
    fields: tuple[tuple[str, str], ...]
    left_out: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Default cache name: ``"<Class>-<16 hex digits>"``."""
        return f"{self.qualname.rsplit('.', 1)[-1]}-{self.digest[:16]}"

    @property
    def fingerprint(self) -> str:
        """One readable line the cache's actor compares: class, length, digest, fields."""
        shown = self.fields[:_MAX_SHOWN_FIELDS]
        body = " ".join(f"{k}={v[:_FIELD_DIGEST_HEX]}" for k, v in shown)
        if len(self.fields) > len(shown):
            rest = stable_digest(self.fields[len(shown) :])[:_FIELD_DIGEST_HEX]
            body += f" +{len(self.fields) - len(shown)}more={rest}"
        text = f"{self.qualname}[{self.length}] digest {self.digest[:16]} ({self.source}: {body}"
        if self.left_out:
            text += "; left out: " + " ".join(self.left_out)
        return text + ")"


# (id(provider), length, stated) -> identity, for providers alive in this process.
_taken: dict[tuple[int, int, str | None], CacheIdentity] = {}
_taken_lock = threading.Lock()


def derive_identity(provider: Any, length: int, stated: str | None = None) -> CacheIdentity:
    """Compute a provider's cache identity, once per provider object in a process.

    Precedence: ``stated`` (the ``raycache.identity`` config key), then the provider's
    ``cache_identity()`` method, then the digest of the provider's attributes under the
    rule in ``docs/identity.md``.

    The identity is taken the first time it is asked for and kept while the provider
    lives: a provider's read counters and other state that changes as it serves items
    must not move a second ``DataCache`` over the same provider to another cache.

    Parameters
    ----------
    provider : Any
        A Hyrax DataProvider or a map-style dataset.
    length : int
        ``len(provider)``.
    stated : str, optional
        ``raycache.identity`` from the config.

    Returns
    -------
    CacheIdentity
        The identity; ``.name`` is the default cache name, ``.fingerprint`` the line the
        cache's actor compares.

    Raises
    ------
    TypeError
        If ``cache_identity`` exists but is not callable.
    """
    key = (id(provider), int(length), stated)
    with _taken_lock:
        known = _taken.get(key)
    if known is not None:
        return known
    identity = _derive(provider, length, stated)
    try:
        weakref.finalize(provider, _forget, key)
    except TypeError:  # not weak-referenceable: no way to know when the id is reused
        return identity
    with _taken_lock:
        return _taken.setdefault(key, identity)


def _forget(key: tuple[int, int, str | None]) -> None:
    with _taken_lock:
        _taken.pop(key, None)


def _derive(provider: Any, length: int, stated: str | None) -> CacheIdentity:
    qualname = type(provider).__qualname__
    digester = _Digester()
    left_out: tuple[str, ...] = ()
    hook = getattr(type(provider), "cache_identity", None)
    if stated is not None:
        source = "raycache.identity"
        fields = (("identity", digester.digest(stated).hex()),)
    elif hook is not None:
        if not callable(hook):
            raise TypeError(
                f"{qualname}.cache_identity must be a method returning the value that "
                f"identifies the provider's items, got {type(hook).__name__}"
            )
        source = "cache_identity()"
        value = provider.cache_identity()
        fields = (("value", digester.digest(value).hex()),)
    else:
        source = "state"
        state = _provider_state(provider)
        kept = _attributes(state)
        left_out = tuple(sorted(str(k) for k in state if k not in kept))
        digester._active.add(id(provider))  # references back to the provider are cycles
        fields = tuple(
            (str(k), digester.digest(v).hex())
            for k, v in sorted(kept.items(), key=lambda kv: str(kv[0]))
        )
    full = hashlib.sha256(repr((qualname, int(length), source, fields)).encode()).hexdigest()
    opaque = tuple(sorted(digester.opaque))
    if opaque or digester.too_deep:
        logger.warning(
            "raycache: the identity of %s takes only the class name of %s%s; if these "
            "decide what the items are, define %s.cache_identity() or set raycache.identity",
            qualname,
            ", ".join(opaque) or "nothing",
            f" and skips objects nested deeper than {_MAX_DEPTH}" if digester.too_deep else "",
            qualname,
        )
    return CacheIdentity(qualname, int(length), full, source, fields, left_out, opaque)


def _provider_state(provider: Any) -> dict[str, Any]:
    state = dict(getattr(provider, "__dict__", None) or {})
    for kind in type(provider).__mro__:
        for slot in getattr(kind, "__slots__", ()) or ():
            if isinstance(slot, str) and hasattr(provider, slot) and slot not in state:
                state[slot] = getattr(provider, slot)
    return state


_FINGERPRINT = re.compile(
    r"^(?P<qualname>.+)\[(?P<length>\d+)\] digest (?P<digest>[0-9a-f]+) "
    r"\((?P<source>[^:]+): (?P<body>.*?)(?:; left out: (?P<left>.*))?\)$"
)


def _parse(fingerprint: str) -> dict | None:
    m = _FINGERPRINT.match(fingerprint)
    if m is None:
        return None
    fields = dict(part.split("=", 1) for part in m["body"].split() if "=" in part)
    return {
        "qualname": m["qualname"],
        "length": int(m["length"]),
        "source": m["source"],
        "fields": fields,
    }


def _differences(cached: str, mine: str) -> list[str]:
    a, b = _parse(cached), _parse(mine)
    if a is None or b is None:
        return []
    out = []
    if a["qualname"] != b["qualname"]:
        out.append(f"class ({a['qualname']} in the cache, {b['qualname']} here)")
    if a["length"] != b["length"]:
        out.append(f"length ({a['length']} in the cache, {b['length']} here)")
    if a["source"] != b["source"]:
        out.append(f"how the identity is given ({a['source']} in the cache, {b['source']} here)")
        return out
    for key in sorted(set(a["fields"]) | set(b["fields"])):
        x, y = a["fields"].get(key), b["fields"].get(key)
        if x != y:
            out.append(f"{key} ({x or 'absent'} in the cache, {y or 'absent'} here)")
    return out


def mismatch_message(name: str, cached_length: int, cached: str, length: int, mine: str) -> str:
    """Say why a provider does not match the cache it asked for, and what to do.

    Parameters
    ----------
    name : str
        The cache name.
    cached_length : int
        The cache's length.
    cached : str
        The cache's fingerprint (``CacheIdentity.fingerprint``).
    length : int
        This client's length.
    mine : str
        This client's fingerprint.

    Returns
    -------
    str
        The message for ``CacheMismatchError``.
    """
    diffs = _differences(cached, mine)
    if not diffs and cached_length != length:
        diffs = [f"length ({cached_length} in the cache, {length} here)"]
    what = "; they differ in " + ", ".join(diffs) if diffs else ""
    return (
        f"cache {name!r} holds {cached_length} items of [{cached}], but this process's "
        f"provider has {length} items of [{mine}]{what}. To keep both, give this provider "
        f"another raycache.name (or a raycache.identity); to drop the cached items and "
        f'refill the cache from this provider, set raycache.on_mismatch = "rebuild" '
        f"(or call raycache.drop_cache({name!r}))."
    )
