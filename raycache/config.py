"""Validated settings for a raycache cache, read from a Hyrax-style config.

raycache reads the three keys Hyrax's ``DataCache`` already understands from the
``data_set`` table and its own keys from a ``raycache`` table. Every key is checked
here, in one place, against the table of defaults below, so that a typo or an
impossible value fails when the config is read and names the key, instead of
surfacing later as a cache that silently does the wrong thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CacheConfig", "ConfigError", "DATA_SET_KEYS", "RAYCACHE_KEYS"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an impossible value."""


@dataclasses.dataclass(frozen=True)
class _Key:
    """One accepted config key: its default, accepted types and a description."""

    default: Any
    types: tuple[type, ...]
    doc: str
    minimum: float | None = None
    nullable: bool = False
    choices: tuple[Any, ...] | None = None


# The data_set keys keep Hyrax's meaning.
DATA_SET_KEYS: dict[str, _Key] = {
    "use_cache": _Key(True, (bool,), "Serve items from the cache; fill it on a miss."),
    "preload_cache": _Key(
        False, (bool,), "start_preload_thread() fills the cache in the background."
    ),
    "preload_threads": _Key(
        8,
        (int,),
        "Provider reads in flight at once while preloading: above 1, the provider is called "
        "from several threads at once, so it must not share one read buffer between calls.",
        minimum=1,
    ),
}

RAYCACHE_KEYS: dict[str, _Key] = {
    "name": _Key(
        None,
        (str,),
        "Cache name; every DataCache with this name on one Ray cluster shares one cache. "
        "Unset: derived from the provider's class, length and state.",
        nullable=True,
    ),
    "identity": _Key(
        None,
        (str,),
        "States what the provider's items are (for example a dataset version): replaces "
        "the digest of the provider's state in the cache's identity (docs/identity.md). "
        "Unset: the provider's cache_identity(), else a digest of its state.",
        nullable=True,
    ),
    "on_mismatch": _Key(
        "error",
        (str,),
        'What to do when the cache under this name holds another provider\'s items: "error" '
        'raises CacheMismatchError; "rebuild" drops that cache and refills it.',
        choices=("error", "rebuild"),
    ),
    "provider": _Key(
        None,
        (str,),
        "module:callable (or file.py:callable) that returns the provider, called with the "
        "config dict; read by `raycache preload`, ignored by caches.",
        nullable=True,
    ),
    "namespace": _Key("raycache", (str,), "Ray namespace of the cache's directory actor."),
    "address": _Key(
        None,
        (str,),
        "Ray address to connect to. Unset: RAY_ADDRESS, then a Ray started with `ray start`, "
        "then the node Ray shared by this user's raycache processes on the node.",
        nullable=True,
    ),
    "max_bytes": _Key(
        None,
        (int,),
        "Byte budget for cached data. Unset: 80% of the cluster's object store. A cache "
        "keeps its creator's budget; a later process that sets another is warned.",
        minimum=1,
        nullable=True,
    ),
    "chunk_size": _Key(
        None,
        (int,),
        "Most items stored in one chunk object. Unset: as many as fit in chunk_bytes, "
        "learned from the first items read.",
        minimum=1,
        nullable=True,
    ),
    "chunk_bytes": _Key(
        64 * 1024 * 1024,
        (int,),
        "Bytes a chunk object is sized for, from the mean size of the items read so far: "
        "where later items are bigger than the first ones, a chunk holds more.",
        minimum=1024,
    ),
    "preload_cpus": _Key(
        1.0,
        (int, float),
        "CPUs each preload reader process reserves while the preload runs; lower it when "
        "trainers hold every CPU of the node, or preload cannot start.",
        minimum=0,
    ),
    "preload_item_timeout_s": _Key(
        300.0,
        (int, float),
        "Longest one provider read may take in a preload; a read still running then is "
        "recorded as failed (stats()['preload_errors']) and the preload goes on without it. "
        "None: no limit.",
        minimum=0.001,
        nullable=True,
    ),
    "preload_on_error": _Key(
        "continue",
        (str,),
        'What a preload does when a provider read fails: "continue" records it '
        '(stats()["preload_errors"]) and reads the rest; "stop" hands out no more units '
        "once a unit has failed reads.",
        choices=("continue", "stop"),
    ),
    "detached": _Key(
        False,
        (bool,),
        "Keep the cache after every client has gone, until dropped explicitly. A process "
        "that sets it keeps a cache that exists already too.",
    ),
    "linger_s": _Key(
        60.0,
        (int, float),
        "Seconds a non-detached cache waits with no client attached before it is freed.",
        minimum=0,
    ),
    "flush_interval_s": _Key(
        0.1,
        (int, float),
        "Longest time an inserted item waits in this process before it is sent (while "
        "this process fills the cache alone: no insert for this long, a full chunk, or 2 s).",
        minimum=0,
    ),
    "zero_copy": _Key(
        False,
        (bool,),
        "Return read-only views of shared memory instead of private copies.",
    ),
    "locality": _Key(
        "off",
        (str,),
        '"nodes": the preload builds each chunk on the node whose trainers read it, by '
        "equal blocks of indices over the cluster's nodes (raycache.locality.node_indices "
        'gives each node its block); "off": wherever Ray runs the preload tasks.',
        choices=("off", "nodes"),
    ),
    "log_dir": _Key(None, (str,), "tensorboardX log directory. Unset: no metrics.", nullable=True),
    "timeout_s": _Key(
        60.0, (int, float), "Longest wait for any single call to the cache.", minimum=0.001
    ),
}


def _check(table: str, key: str, spec: _Key, value: Any) -> Any:
    where = f"{table}.{key}"
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"config key {where!r} may not be None; default is {spec.default!r}")
    # bool is an int subclass; only accept it where bool is meant.
    if isinstance(value, bool) and bool not in spec.types:
        raise ConfigError(f"config key {where!r} must be {_names(spec.types)}, got bool {value!r}")
    if not isinstance(value, spec.types):
        raise ConfigError(
            f"config key {where!r} must be {_names(spec.types)}, "
            f"got {type(value).__name__} {value!r}"
        )
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"config key {where!r} must be >= {spec.minimum}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(
            f"config key {where!r} must be one of {', '.join(map(repr, spec.choices))}, "
            f"got {value!r}"
        )
    if key in ("name", "identity") and not value.strip():
        raise ConfigError(f"config key {where!r} must be a non-empty string")
    return value


# Keys of Hyrax's data_set table that are not cache keys, although some are spelt like one.
_HYRAX_DATA_SET_KEYS = frozenset(
    {
        "crop_to",
        "filters",
        "filter_catalog",
        "transform",
        "train_size",
        "validate_size",
        "test_size",
        "seed",
        "object_id_column_name",
        "filter_column_name",
        "filename_column_name",
        "nan_mode",
        "nan_quantile",
        "astropy_table",
        "semi_width_deg",
        "semi_height_deg",
    }
)

_FLAT_EXAMPLE = (
    "{'data_set': {'use_cache': True, 'preload_cache': False}, "
    "'raycache': {'name': 'my-cache', 'max_bytes': 2_000_000_000}} "
    '(in TOML: [data_set] use_cache = true ... [raycache] name = "my-cache")'
)


def _warn_near_miss(key: Any) -> None:
    """Warn when an unknown data_set key is spelt almost like a cache key."""
    if not isinstance(key, str) or key in _HYRAX_DATA_SET_KEYS:
        return
    if key in RAYCACHE_KEYS:
        warnings.warn(
            f"config key data_set.{key} is not read: raycache's own keys go in the "
            f"[raycache] table (raycache.{key})",
            UserWarning,
            stacklevel=4,
        )
        return
    known = sorted(DATA_SET_KEYS) + [f"raycache.{k}" for k in RAYCACHE_KEYS]
    bare = {k.split(".", 1)[-1]: k for k in known}
    near = difflib.get_close_matches(key, list(bare), n=1, cutoff=0.8)
    if near:
        warnings.warn(
            f"config key data_set.{key} is not a key raycache or Hyrax's cache reads; "
            f"did you mean {bare[near[0]] if '.' in bare[near[0]] else 'data_set.' + near[0]}?",
            UserWarning,
            stacklevel=4,
        )


def _check_shape(config: Mapping[str, Any]) -> None:
    """Refuse a config whose cache keys are not inside the data_set/raycache tables."""
    flat = sorted(
        k
        for k, v in config.items()
        if isinstance(k, str)
        and (k in DATA_SET_KEYS or k in RAYCACHE_KEYS)
        and not isinstance(v, Mapping)
    )
    if flat:
        raise ConfigError(
            f"config keys {flat} are at the top level, where they are not read; the config "
            f"is a dict of tables: Hyrax's cache keys (use_cache, preload_cache, "
            f"preload_threads) go in 'data_set' and raycache's keys in 'raycache', e.g. "
            f"{_FLAT_EXAMPLE}"
        )


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _read_table(config: Mapping[str, Any], table: str, keys: dict[str, _Key]) -> dict[str, Any]:
    raw = config.get(table, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config table {table!r} must be a table, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        if key not in keys:
            if table == "data_set":
                # Hyrax's data_set table holds many keys raycache does not use; only a
                # key that looks like a misspelt cache key is worth a word.
                _warn_near_miss(key)
                continue
            raise ConfigError(
                f"unknown config key {table}.{key!r}; accepted keys: {', '.join(sorted(keys))}"
            )
        out[key] = _check(table, key, keys[key], value)
    return out


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Settings of one cache, validated.

    Build it with :meth:`from_dict` (a Hyrax-style nested dict), :meth:`from_toml`
    (a TOML file with the same tables) or :meth:`coerce` (either, or a CacheConfig).
    The accepted keys, their defaults and meanings are in ``DATA_SET_KEYS`` and
    ``RAYCACHE_KEYS`` and in ``docs/configuration.md``.
    """

    use_cache: bool = DATA_SET_KEYS["use_cache"].default
    preload_cache: bool = DATA_SET_KEYS["preload_cache"].default
    preload_threads: int = DATA_SET_KEYS["preload_threads"].default
    name: str | None = None
    identity: str | None = None
    on_mismatch: str = RAYCACHE_KEYS["on_mismatch"].default
    provider: str | None = None
    namespace: str = RAYCACHE_KEYS["namespace"].default
    address: str | None = None
    max_bytes: int | None = None
    chunk_size: int | None = None
    chunk_bytes: int = RAYCACHE_KEYS["chunk_bytes"].default
    preload_cpus: float = RAYCACHE_KEYS["preload_cpus"].default
    preload_item_timeout_s: float | None = RAYCACHE_KEYS["preload_item_timeout_s"].default
    preload_on_error: str = RAYCACHE_KEYS["preload_on_error"].default
    detached: bool = False
    linger_s: float = RAYCACHE_KEYS["linger_s"].default
    flush_interval_s: float = RAYCACHE_KEYS["flush_interval_s"].default
    zero_copy: bool = False
    locality: str = RAYCACHE_KEYS["locality"].default
    log_dir: str | None = None
    timeout_s: float = RAYCACHE_KEYS["timeout_s"].default

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> CacheConfig:
        """Read and validate a Hyrax-style config.

        Parameters
        ----------
        config : Mapping[str, Any] or None
            A dict with an optional ``data_set`` table (Hyrax's keys ``use_cache``,
            ``preload_cache``, ``preload_threads``; other Hyrax keys are ignored) and an
            optional ``raycache`` table. None means all defaults.

        Returns
        -------
        CacheConfig
            The validated settings.

        Raises
        ------
        ConfigError
            For an unknown ``raycache`` key, a wrong type or an impossible value, or
            cache keys outside their tables (a flat config); the message names the key
            and what is accepted.

        Warns
        -----
        UserWarning
            For a ``data_set`` key spelt almost like a cache key (``preload_cahce``), or
            a raycache key put in ``data_set``; the message names the key meant.
        """
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a dict of tables, got {type(config).__name__}")
        _check_shape(config)
        values = _read_table(config, "data_set", DATA_SET_KEYS)
        values.update(_read_table(config, "raycache", RAYCACHE_KEYS))
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> CacheConfig:
        """Read and validate a TOML file holding ``[data_set]`` and ``[raycache]`` tables.

        Parameters
        ----------
        path : str or Path
            The TOML file.

        Returns
        -------
        CacheConfig
            The validated settings.
        """
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    @classmethod
    def coerce(cls, config: CacheConfig | Mapping[str, Any] | str | Path | None) -> CacheConfig:
        """Accept a CacheConfig, a config dict, a TOML path, or None (defaults).

        Parameters
        ----------
        config : CacheConfig, Mapping, str, Path or None
            What to read.

        Returns
        -------
        CacheConfig
            The validated settings.
        """
        if isinstance(config, CacheConfig):
            return config
        if isinstance(config, (str, Path)):
            return cls.from_toml(config)
        return cls.from_dict(config)

    def replace(self, **changes: Any) -> CacheConfig:
        """Return a copy with some keys changed, validated like the originals.

        Parameters
        ----------
        **changes : Any
            Keys of ``DATA_SET_KEYS`` or ``RAYCACHE_KEYS`` and their new values.

        Returns
        -------
        CacheConfig
            The new settings.
        """
        return CacheConfig.from_dict(_split(dataclasses.asdict(self) | changes))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Return the settings as a Hyrax-style nested dict that :meth:`from_dict` reads.

        Returns
        -------
        dict
            ``{"data_set": {...}, "raycache": {...}}``.
        """
        return _split(dataclasses.asdict(self))


def _split(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    unknown = set(flat) - set(DATA_SET_KEYS) - set(RAYCACHE_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(unknown)}; accepted keys: "
            f"{', '.join(sorted(set(DATA_SET_KEYS) | set(RAYCACHE_KEYS)))}"
        )
    return {
        "data_set": {k: v for k, v in flat.items() if k in DATA_SET_KEYS},
        "raycache": {k: v for k, v in flat.items() if k in RAYCACHE_KEYS},
    }
