"""Which shared cache a provider's items go to, and this process's attachment to it.

``AttachedCache`` is the base of ``raycache.DataCache``: it holds the settings, the
provider and the cache name (``raycache.name``, or one derived from the provider's
identity), and attaches this process to the shared cache on first use, not in the
constructor, because Hyrax builds its ``DataCache`` inside ``DataProvider.__init__``,
before the provider is complete. It decides where the cache cannot be used: with
``use_cache`` off, in a forked child that had not attached before the fork (Ray is not
fork-safe), inside a preload task (the provider's own cache must neither answer nor
insert there), and after ``close()``. Pickled, it carries its settings, name and provider,
and joins the same Ray in the process that unpickles it (a spawned DataLoader worker).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from raycache.client import CacheClient
from raycache.config import CacheConfig
from raycache.errors import CacheUnavailableError, ray_errors_as_plain
from raycache.indices import check_index
from raycache.metrics import ReadMetrics
from raycache.mismatch import attach_with_policy
from raycache.miss_reads import MissReads
from raycache.naming import default_name, fingerprint
from raycache.provider import bypass_active, provider_length, unpickling_for_task
from raycache.runtime import gcs_address, in_forked_child
from raycache.span_table import SpanTable

__all__ = ["AttachedCache"]

logger = logging.getLogger(__name__)


class AttachedCache:
    """A provider's shared cache, attached in this process on first use.

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
        self._spans = SpanTable()  # where mapped chunks' rows lie, kept between batches

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

    def close(self) -> None:
        """Detach this process from the cache. The shared cache stays for the others."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._metrics.close()

    def __enter__(self) -> AttachedCache:
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
        return (_restore, (type(self), config, name, self._data_provider))


def _restore(
    cls: type[AttachedCache], config: CacheConfig, name: str | None, provider: Any
) -> AttachedCache:
    cache = cls(config if name is None else config.replace(name=name), provider)
    # Inside a preload task the provider's own cache must neither answer nor insert.
    cache._inert = unpickling_for_task()
    return cache
