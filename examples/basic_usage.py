"""A tour of raycache's user-facing API on an embedded local Ray (runs in ~30 s).

Run: ``python examples/basic_usage.py``
"""

from __future__ import annotations

import numpy as np
import ray
import torch

import raycache


class Cutouts:
    """A map-style dataset of synthetic 3x32x32 cutouts with a label and an id."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.default_rng(idx)
        return {
            "image": rng.standard_normal((3, 32, 32), dtype=np.float32),
            "label": idx % 10,
            "object_id": f"obj-{idx:05d}",
        }


def main() -> None:
    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 4},
        "raycache": {"name": "basic-usage", "chunk_size": 256, "linger_s": 0},
    }
    ds = raycache.CachedDataset(Cutouts(2000), config)  # starts Ray and the preload
    assert ds.cache.wait_for_preload(timeout=300)
    print("after preload:", {k: ds.cache.stats()[k] for k in ("items", "bytes", "chunks")})

    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, collate_fn=ds.collate)
    for epoch in range(2):
        n = sum(len(batch["label"]) for batch in loader)
        print(f"epoch {epoch}: {n} items")

    item = ds.cache.try_fetch(7)  # the seed API: an item, or None on a miss
    assert np.array_equal(item["image"], Cutouts(2000)[7]["image"])
    item["image"][:] = 0  # a private copy: the cache is unchanged
    assert ds.cache.try_fetch(7)["image"].any()

    stats = ds.cache.stats()
    print("hits", stats["hits"], "misses", stats["misses"], "caches", raycache.list_caches())
    ds.cache.close()
    raycache.drop_cache("basic-usage")
    ray.shutdown()


if __name__ == "__main__":
    main()
