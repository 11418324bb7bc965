"""raycache: a training-data cache for PyTorch that lives in Ray's shared object store.

One cache per name per Ray cluster: every trainer process that attaches to it (DDP
ranks, DataLoader workers, Ray Train workers) reads the same bytes zero-copy, so N
trainers on a node cost one copy of the data, and the cache outlives any one trainer.
The API is Hyrax's ``DataCache``; ``CachedDataset`` wraps it as a torch Dataset.
"""

import importlib
from typing import Any

# Exports are imported on first use: a Ray worker that imports raycache.directory or
# raycache.preload must not import torch (through CachedDataset) and pay ~150 MB for it.
_EXPORTS = {
    "cache_stats": "raycache.admin",
    "drop_cache": "raycache.admin",
    "list_caches": "raycache.admin",
    "GatheredBatch": "raycache.gathered",
    "collate": "raycache.gathered",
    "CacheConfig": "raycache.config",
    "DataCache": "raycache.data_cache",
    "CachedDataset": "raycache.dataset",
    "CacheMismatchError": "raycache.errors",
    "CacheUnavailableError": "raycache.errors",
    "ConfigError": "raycache.errors",
    "PreloadFailedError": "raycache.errors",
    "ProviderNotPicklableError": "raycache.errors",
    "UnsupportedValueError": "raycache.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raycache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CacheConfig",
    "CacheMismatchError",
    "CacheUnavailableError",
    "CachedDataset",
    "ConfigError",
    "DataCache",
    "GatheredBatch",
    "PreloadFailedError",
    "ProviderNotPicklableError",
    "UnsupportedValueError",
    "cache_stats",
    "collate",
    "drop_cache",
    "list_caches",
]

__version__ = "0.1.0"
