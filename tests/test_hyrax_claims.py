"""Hyrax fills: a claim ended a moment ago makes a late reader fetch the item, not read it."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from providers import ArrayProvider, make_item
from test_values import assert_same

import raycache
import raycache.client.local_map
from raycache import DataCache
from raycache.hyrax.claims import HELD, MINE, STORED, board
from raycache.hyrax.fill import OnceFill


@pytest.fixture
def pair(ray_address, cache_name):
    """Two processes' worth of ``OnceFill`` over one cache of 16 items (chunks of 4)."""
    config = {"raycache": {"name": cache_name, "chunk_size": 4}}
    fills = [OnceFill(DataCache(config, ArrayProvider(16))) for _ in range(2)]
    yield fills
    for fill in fills:
        fill.close()
        fill.shared.close()
    raycache.drop_cache(cache_name)


def test_the_board_answers_mine_held_and_stored(ray_address, cache_name):
    claims = board(DataCache({"raycache": {"name": cache_name}}, ArrayProvider(4)).config.namespace)
    assert ray.get(claims.claim.remote(cache_name, 1, "a"), timeout=30) == MINE
    assert ray.get(claims.claim.remote(cache_name, 1, "b"), timeout=30) == HELD
    assert ray.get(claims.claim.remote(cache_name, 1, "a"), timeout=30) == HELD  # exclusive
    ray.get(claims.done_many.remote(cache_name, [1]), timeout=30)
    assert ray.get(claims.wait.remote(cache_name, 1, 5.0), timeout=30)
    assert ray.get(claims.claim.remote(cache_name, 1, "b"), timeout=30) == STORED
    assert ray.get(claims.claim.remote(cache_name, 1, "b", False), timeout=30) == MINE
    assert ray.get(claims.claim.remote(cache_name, 2, "b"), timeout=30) == MINE


def test_a_reader_whose_map_is_behind_fetches_what_another_stored(pair, cache_name, monkeypatch):
    # Maps catch up on a miss at most every MIN_SYNC_S: make that never, so that the
    # second process's map is behind the first one's insert, as within ~50 ms it can be.
    first, second = pair
    assert second.fetch(0) is None  # claimed: second reads item 0
    second.insert(0, make_item(0))
    second.send()
    monkeypatch.setattr(raycache.client.local_map, "MIN_SYNC_S", 3600.0)
    assert first.fetch(5) is None  # claimed: first reads item 5 ...
    first.insert(5, make_item(5))
    first.send()  # ... stores it and ends the claim
    claims = board(first.shared.config.namespace)
    assert ray.get(claims.wait.remote(cache_name, 5, 10.0), timeout=30)
    assert second.shared.try_fetch(5) is None  # second's map is behind
    item = second.fetch(5)  # told STORED: catches up and fetches it
    assert item is not None
    assert_same(item, make_item(5))
    assert second.fetch(6) is None  # nobody stored 6: second's to read


def test_a_claim_ended_without_a_store_is_taken_by_the_next_reader(pair, cache_name):
    first, second = pair
    assert first.fetch(3) is None
    claims = board(first.shared.config.namespace)
    ray.get(claims.done_many.remote(cache_name, [3]), timeout=30)  # its read failed
    assert second.fetch(3) is None  # STORED, but not in the cache: second reads it
    assert ray.get(claims.claim.remote(cache_name, 3, "x"), timeout=30) == HELD
    second.insert(3, make_item(3))
    second.send()
    assert ray.get(claims.wait.remote(cache_name, 3, 10.0), timeout=30)
    assert np.array_equal(first.fetch(3)["data"]["image"], make_item(3)["data"]["image"])
