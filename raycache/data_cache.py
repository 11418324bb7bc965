"""``DataCache``: Hyrax's cache API, backed by one shared cache in Ray's object store.

Code written for Hyrax's ``DataCache(config, data_provider)`` keeps working: the same
constructor, ``start_preload_thread``, ``try_fetch``, ``insert_into_cache`` and
``_data_size``, the same config keys and the same error types. What changes is where
items live: not in a dict inside each trainer, but in chunks owned by a named Ray actor
that every process using the same cache name reads, zero-copy.

The connection to Ray is made on first use, not in the constructor: Hyrax builds its
``DataCache`` inside ``DataProvider.__init__``, before the provider is complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import ray

from raycache.batch import gather, read_partial
from raycache.client import CacheClient
from raycache.config import CacheConfig
from raycache.errors import CacheUnavailableError, ray_errors_as_plain
from raycache.indices import check_index, index_array
from raycache.metrics import ReadMetrics
from raycache.mismatch import attach_with_policy
from raycache.miss_reads import MissReads
from raycache.naming import default_name, fingerprint
from raycache.protocol import chunk_ids
from raycache.provider import (
    bypass_active,
    pickle_provider,
    provider_length,
    unpickling_for_task,
)
from raycache.runtime import gcs_address, in_forked_child
from raycache.values import data_size

__all__ = ["DataCache"]

logger = logging.getLogger(__name__)


class DataCache:
    """A cache of provider items shared by every process that uses the same cache name.

    The first epoch fills the cache from the provider (``insert_into_cache`` on each
    miss); later epochs are served from it (``try_fetch``); ``start_preload_thread``
    optionally fills it in the background with Ray tasks.

    Config keys read (see ``docs/configuration.md`` for defaults):

    - ``data_set.use_cache``: serve from the cache; when False nothing is cached.
    - ``data_set.preload_cache``: ``start_preload_thread()`` starts a preload.
    - ``data_set.preload_threads``: provider reads in flight during preload.
    - ``raycache.name``, ``namespace``, ``address``, ``max_bytes``, ``chunk_size``,
      ``chunk_bytes``, ``detached``, ``linger_s``, ``flush_interval_s``, ``zero_copy``,
      ``log_dir``, ``timeout_s``, ``preload_item_timeout_s``, ``preload_on_error``.

    Parameters
    ----------
    config : dict, CacheConfig, str or Path
        A Hyrax-style config dict, a validated ``CacheConfig``, or a TOML file path.
    data_provider : Any
        A Hyrax DataProvider (``len`` and ``resolve_data``) or a map-style dataset
        (``len`` and ``[]``).
    """

    logging_interval = 1000

    def __init__(self, config: Any, data_provider: Any):
        self.config = CacheConfig.coerce(config)
        self._data_provider = data_provider
        self._use_cache = self.config.use_cache
        self._preload_cache = self.config.preload_cache
        self._name = self.config.name
        self._max_length: int | None = None
        self._client: CacheClient | None = None
        self._attach_lock = threading.Lock()
        self._inert = False
        self._closed = False
        self._warned_fork = False
        self._metrics = ReadMetrics(lambda: self.logging_interval)
        self._miss_reads = MissReads(self)

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        """The cache name: ``raycache.name``, or one derived from the provider."""
        if self._name is None:
            self._name = default_name(self._data_provider, self._length(), self.config.identity)
        return self._name

    def _length(self) -> int:
        if self._max_length is None:
            self._max_length = provider_length(self._data_provider)
        return self._max_length

    def __len__(self) -> int:
        return self._length()

    def check_index(self, idx: Any) -> int:
        """Return ``idx`` as an int, or raise the seed's error types.

        Parameters
        ----------
        idx : Any
            A provider index.

        Returns
        -------
        int
            The index.

        Raises
        ------
        RuntimeError
            If ``idx`` is not an integer.
        IndexError
            If ``idx`` is out of range.
        """
        return check_index(idx, self._length())

    # ------------------------------------------------------------------ attach
    def using_cache(self) -> bool:
        """Return True when a call now should use the cache (not disabled, bypassed, inert).

        Returns
        -------
        bool
            False with ``use_cache`` off, inside a preload task, or while the provider
            reads through its own cache (``raycache.provider.bypass_active``).
        """
        return self._use_cache and not self._inert and not bypass_active()

    @property
    def client(self) -> CacheClient | None:
        """The attached client, or None before the first use (attaches nothing)."""
        return self._client

    @property
    def miss_reads(self) -> MissReads:
        """What a reader does about its misses while a preload runs (``MissReads``)."""
        return self._miss_reads

    def attach(self) -> CacheClient | None:
        """Attach to the shared cache unless attached; the client, None if unusable here.

        Attaching happens on first use; a dataset attaches at once instead, so that
        DataLoader workers forked later can read what was mapped before the fork.

        Returns
        -------
        CacheClient or None
            The client; None where Ray cannot be used (a forked child that had not
            attached, or a lost cache).

        Raises
        ------
        CacheUnavailableError
            If this cache was closed in this process.
        """
        client = self._client
        if client is not None:
            return None if client.dead else client
        if self._closed:
            raise CacheUnavailableError(f"cache {self.name!r} was closed in this process")
        if in_forked_child():
            if not self._warned_fork:
                self._warned_fork = True
                logger.warning(
                    "raycache %s: this process was forked from a Ray process and had not "
                    "attached before the fork; reading from the provider",
                    self.name,
                )
            return None
        with self._attach_lock:
            if self._client is None:
                self._client = self._attach_client()
                if self.config.log_dir:
                    self._metrics.open(self.config.log_dir, f"client-{self.name}")
        return self._client

    def _attach_client(self) -> CacheClient:
        """Create this process's client, per ``raycache.on_mismatch``; plain errors only."""
        from raycache.admin import drop_cache

        config, name, length = self.config, self.name, self._length()
        described = fingerprint(self._data_provider, length, config.identity)
        with ray_errors_as_plain(f"attaching to cache {name!r}"):
            return attach_with_policy(
                lambda: CacheClient(config, name, length, described),
                lambda: drop_cache(name, config.namespace, config.address),
                config.on_mismatch,
                name,
            )

    # ------------------------------------------------------------------ seed API
    def start_preload_thread(self) -> None:
        """Start preloading the whole provider into the cache, if configured.

        Runs only when ``use_cache`` and ``preload_cache`` are both set. The preload
        runs as Ray tasks owned by the cache, once per cache however many processes
        call this; the call returns at once. ``wait_for_preload`` waits for it.

        Raises
        ------
        ProviderNotPicklableError
            If the provider cannot be pickled for the preload tasks.
        """
        if not (self.using_cache() and self._preload_cache):
            return
        blob = pickle_provider(self._data_provider)
        client = self.attach()
        if client is None:
            return
        with ray_errors_as_plain(f"starting the preload of cache {self.name!r}"):
            client.waits.start(blob, self.config)

    def try_fetch(self, idx: int) -> dict | None:
        """Fetch item ``idx`` from the cache.

        Parameters
        ----------
        idx : int
            Provider index (Python or numpy integer) in ``[0, len(provider))``.

        Returns
        -------
        dict or None
            The item, or None on a miss. Arrays are private copies, safe to modify,
            unless ``raycache.zero_copy`` is set (then read-only views).

        Raises
        ------
        RuntimeError
            If ``idx`` is not an integer.
        IndexError
            If ``idx`` is out of range.
        """
        if not self.using_cache():
            return None
        idx = check_index(idx, self._length())
        start = time.perf_counter()
        client = self.attach()
        item = None if client is None else client.get(idx, copy=not self.config.zero_copy)
        if client is not None:
            client.count(int(item is not None), int(item is None))
        self._metrics.timed("hit" if item is not None else "miss", start)
        return item

    def insert_into_cache(self, idx: int, data: Any) -> None:
        """Insert item ``idx`` into the cache.

        The item is validated and copied at once, visible to this process at once and
        to other processes within ``flush_interval_s`` (or after ``flush()``); a process
        that fills the cache alone sends a chunk's worth at a time, at most 2 s after the
        oldest item it holds (see ``docs/configuration.md``). An index already cached
        keeps its first value.

        Parameters
        ----------
        idx : int
            Provider index in ``[0, len(provider))``.
        data : dict
            The item: numpy arrays, CPU tensors, numbers, str, bytes, None, and
            dict/list/tuple of those.

        Raises
        ------
        RuntimeError
            If ``idx`` is not an integer, or ``data`` holds an unsupported type
            (``UnsupportedValueError``, naming the field path).
        IndexError
            If ``idx`` is out of range.
        """
        if not self.using_cache():
            return
        idx = check_index(idx, self._length())
        start = time.perf_counter()
        client = self.attach()
        if client is None:
            return
        client.put(idx, data)
        self._metrics.inserted(data)
        self._metrics.timed("insert", start)

    @staticmethod
    def _data_size(data: Any, seen: set[int] | None = None) -> int:
        """Return the bytes ``data`` occupies, each shared numpy base counted once.

        Parameters
        ----------
        data : Any
            An item.
        seen : set of int, optional
            Objects already counted.

        Returns
        -------
        int
            Size in bytes.
        """
        return data_size(data, seen)

    # ------------------------------------------------------------------ additions
    def fetch_many(self, indices: Sequence[int], wait: bool = True) -> list[Any]:
        """Fetch a batch of items with one vectorised copy per field.

        Parameters
        ----------
        indices : Sequence[int]
            Provider indices (Python or numpy integers, or an integer array).
        wait : bool
            For a miss on an index that a preload task is reading right now, wait
            for its unit (at most ~5 s) instead of returning None, so that the item
            is not read twice. False does not wait for the preload: such a miss is
            None at once (see ``CachedDataset.__getitems__``, which reads the other
            misses first). While this process fills the cache alone (it inserts, and
            nothing else changes the cache), False does not wait for the cache's
            answer to a miss either, and reads with the map as of its last miss.
            Otherwise, and always with True, a miss asks the cache what changed (at
            most every 50 ms in a process) before it is returned as None.

        Returns
        -------
        list
            The items in the order of ``indices``, None in place of each miss. When all
            are cached and share one structure, a ``raycache.GatheredBatch``, which
            ``raycache.collate`` turns into tensors without a per-item step.

        Raises
        ------
        RuntimeError
            If an index is not an integer.
        IndexError
            If an index is out of range.
        """
        idx = index_array(indices, self._length())
        if not self.using_cache() or not len(idx):
            return [None] * len(idx)
        client = self.attach()
        if client is None:
            return [None] * len(idx)
        start = time.perf_counter()
        loc = client.locate(idx, wait)
        copy = not self.config.zero_copy
        if copy and loc.min() >= 0:  # all cached: no np.unique, one dict lookup per chunk
            chunks = client.mapped(dict.fromkeys(chunk_ids(loc).tolist()))
            if chunks is not None:
                client.count(hits=len(idx))
                self._metrics.timed("hit", start)
                return gather(chunks, loc)
        out = read_partial(client, idx, loc, copy, wait)
        hits = sum(item is not None for item in out)
        client.count(hits, len(out) - hits)
        self._metrics.timed("hit" if hits == len(out) else "miss", start)
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Send this process's buffered inserts to the cache now.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait; default ``raycache.timeout_s``.

        Returns
        -------
        bool
            True when everything was sent.
        """
        if self._client is None:
            return True
        return self._client.flush(timeout)

    def wait_for_preload(self, timeout: float | None = None) -> bool:
        """Wait for the cache's preload to end.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait; None waits until the preload ends.

        Returns
        -------
        bool
            True if no preload is running (it ended, with or without errors, or none
            was started); False if ``timeout`` passed first. Errors are in
            ``stats()["preload_errors"]``.

        Raises
        ------
        PreloadFailedError
            If the preload ended and stored nothing: every read failed.
        """
        if not self.using_cache():
            return True
        client = self.attach()
        if client is None:
            return True
        with ray_errors_as_plain(f"waiting for the preload of cache {self.name!r}"):
            return client.waits.wait_for_end(timeout)

    def stats(self) -> dict:
        """Return the cache's counters.

        Returns
        -------
        dict
            ``name``, ``length``, ``items`` (cached), ``bytes``, ``max_bytes``,
            ``chunks``, ``hits``, ``misses`` (over all clients), ``rejected_items``,
            ``inserted_items`` and ``preloaded_items`` (how many of ``items`` were
            stored from inserts and from the preload), ``clients``, ``preload``
            (state, ``loaded``: items its tasks read, ``reserved``: items trainers
            are reading for it now, seconds), ``preload_errors``
            (``[{"index", "error"}]``), and ``client`` (this process's hits, misses
            and buffered items). With ``use_cache`` off: ``length``, zero counts.
        """
        if not self._use_cache or self._inert:
            return {
                "name": self._name,
                "length": self._length(),
                "items": 0,
                "bytes": 0,
                "hits": 0,
                "misses": 0,
                "use_cache": False,
                "preload_errors": [],
            }
        client = self._client or self.attach()  # a lost client says why (client.stats)
        if client is None:
            raise CacheUnavailableError(f"cache {self.name!r} is unavailable in this process")
        with ray_errors_as_plain(f"reading the counters of cache {self.name!r}"):
            out = client.stats()
        out["use_cache"] = True
        return out

    def close(self) -> None:
        """Detach this process from the cache. The shared cache stays for the others."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._metrics.close()

    def __enter__(self) -> DataCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ pickling
    def __reduce__(self) -> tuple:
        config = self.config
        if self._use_cache and config.address is None and ray.is_initialized():
            # A spawned DataLoader worker must join this process's Ray, not start its own.
            config = config.replace(address=gcs_address())
        name = self._name
        if name is None and self._use_cache and not self._inert:
            name = self.name
        return (_restore, (config, name, self._data_provider))


def _restore(config: CacheConfig, name: str | None, provider: Any) -> DataCache:
    cache = DataCache(config if name is None else config.replace(name=name), provider)
    # Inside a preload task the provider's own cache must neither answer nor insert.
    cache._inert = unpickling_for_task()
    return cache
