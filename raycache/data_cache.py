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
import time
from collections.abc import Sequence
from typing import Any

from raycache.attachment import AttachedCache
from raycache.batch import gather, read_partial
from raycache.errors import CacheUnavailableError, ray_errors_as_plain
from raycache.indices import check_index, index_array
from raycache.protocol import chunk_ids
from raycache.provider import (
    pickle_provider,
)
from raycache.values import data_size

__all__ = ["DataCache"]

logger = logging.getLogger(__name__)


class DataCache(AttachedCache):
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

    def try_fetch(self, idx: int, *, wait: bool = True) -> dict | None:
        """Fetch item ``idx`` from the cache.

        Parameters
        ----------
        idx : int
            Provider index (Python or numpy integer) in ``[0, len(provider))``.
        wait : bool
            As for ``fetch_many``: True waits (at most ~5 s) for a preload task that
            is reading ``idx``; False returns None at once.

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
        item = None if client is None else client.get(idx, not self.config.zero_copy, wait)
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

    def insert_many(self, indices: Sequence[int], items: Sequence[Any]) -> None:
        """Insert items as ``insert_into_cache`` does each, copying a batch per field.

        Parameters
        ----------
        indices : Sequence[int]
            Provider indices.
        items : Sequence[Any]
            The items, in the same order; a bad one raises ``UnsupportedValueError``
            naming its index and field, once the items before it are inserted.
        """
        if not self.using_cache() or not len(items):
            return
        checked = index_array(indices, self._length()).tolist()
        start = time.perf_counter()
        client = self.attach()
        if client is not None:
            client.put_many(checked, list(items))
            share = (time.perf_counter() - start) / len(items)  # each insert's mean time
            for item in items:
                self._metrics.inserted(item)
                self._metrics.timed("insert", time.perf_counter() - share)

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
            For a miss on an index a preload task is reading now, wait for its unit
            (at most ~5 s) instead of returning None, so the item is not read twice.
            False: such a miss is None at once (``CachedDataset.__getitems__`` reads
            the other misses first), and while this process fills the cache alone
            (nothing else changes it) a miss does not wait for the cache's answer.
            Otherwise a miss asks what changed (at most every 50 ms) before it is None.

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
        copy = not self.config.zero_copy
        batch = client.warm.batch(idx) if copy else None  # one take per field, if warm
        if batch is None:
            loc = client.locate(idx, wait)
            if copy and loc.min() >= 0:  # all cached: no np.unique, one lookup per chunk
                chunks = client.mapped(dict.fromkeys(chunk_ids(loc).tolist()))
                batch = None if chunks is None else gather(chunks, loc, self._spans)
        if batch is not None:
            client.count(hits=len(idx))
            self._metrics.timed("hit", start)
            return batch
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
            If the preload stored nothing (every read failed), or could not run: every
            preload task failed, say because Ray's workers cannot import the provider's
            module. The message gives the first error and what to do.
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
            ``name``, ``length``, ``items`` (cached), ``bytes``, ``max_bytes``, ``chunks``,
            ``hits``, ``misses`` (over all clients: every read this process made before
            the call, other processes' as of their last heartbeat, every 5 s, or their
            ``close()``), ``rejected_items``, ``inserted_items`` and ``preloaded_items``
            (how many of ``items`` were stored from inserts and from the preload),
            ``clients``, ``preload`` (state, ``loaded``: items its tasks read,
            ``reserved``: items trainers are reading for it now, seconds),
            ``preload_errors`` (``[{"index", "error"}]``), and ``client`` (this process's
            hits, misses, buffered items, and the mean seconds of its reads and inserts,
            ``hit_s``, ``miss_s`` and ``cache_insert_s``, None before the first; the
            tensorboardX scalars of the same names average them per 1,000 calls;
            ``insert_path``: ``"shared memory"`` where the cache's actor reads this
            process's inserts from its memory, ``"call arguments"`` where they travel as
            Ray call arguments, see ``docs/memory.md``). ``use_cache`` off: zero counts.
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
        out["client"].update(self._metrics.summary())
        out["use_cache"] = True
        return out
