"""raycache: a training-data cache for PyTorch that lives in Ray's shared object store.

One cache per name per Ray cluster: every trainer process that attaches to it (DDP
ranks, DataLoader workers, Ray Train workers) reads the same bytes zero-copy, so N
trainers on a node cost one copy of the data, and the cache outlives any one trainer.
The API is Hyrax's ``DataCache``; ``CachedDataset`` wraps it as a torch Dataset.
"""

from raycache.admin import cache_stats, drop_cache, list_caches
from raycache.batch import GatheredBatch, collate
from raycache.config import CacheConfig
from raycache.data_cache import DataCache
from raycache.dataset import CachedDataset
from raycache.errors import (
    CacheMismatchError,
    CacheUnavailableError,
    ConfigError,
    ProviderNotPicklableError,
    UnsupportedValueError,
)

__all__ = [
    "CacheConfig",
    "CacheMismatchError",
    "CacheUnavailableError",
    "CachedDataset",
    "ConfigError",
    "DataCache",
    "GatheredBatch",
    "ProviderNotPicklableError",
    "UnsupportedValueError",
    "cache_stats",
    "collate",
    "drop_cache",
    "list_caches",
]

__version__ = "0.1.0"
