"""Hyrax fills: each item is read by one reader, which never waits for its own claim.

A claim ended a moment ago makes a late reader fetch the item, not read it; a reader that
asks again for what it claimed reads it; a forked worker that left frees its claims.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
from providers import ArrayProvider, make_item
from test_values import assert_same

import raycache
import raycache.client.local_map
from raycache import DataCache
from raycache.hyrax.claims import HELD, MINE, STORED, board
from raycache.hyrax.fill import WAIT_S, OnceFill


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
    # ``first`` still counts 3 as its own claim, so its fetch looks at the cache only: let
    # its map learn of the store now rather than at the next rate-limited sync.
    first.shared.client.sync(force=True)
    assert np.array_equal(first.fetch(3)["data"]["image"], make_item(3)["data"]["image"])


def test_a_reader_asking_again_for_what_it_claimed_is_told_to_read_it(pair, cache_name):
    # Its read failed (or it looked before reading): it must not wait for its own claim,
    # which would hold it for WAIT_S (2026-12-07: 30 s per such index).
    first, _ = pair
    assert first.fetch(2) is None
    start = time.monotonic()
    assert first.fetch(2) is None
    assert time.monotonic() - start < WAIT_S / 3
    claims = board(first.shared.config.namespace)
    assert ray.get(claims.claim.remote(cache_name, 2, "x"), timeout=30) == HELD  # still held


def test_forked_readers_of_one_process_never_both_read_an_item(pair, cache_name):
    # A parent answers its forked workers under its own name: worker 2 waits for worker
    # 1's read of an item, and worker 1, asking again, is told to read it.
    first, _ = pair
    assert first.fetch(4, reader=1) is None
    assert first.fetch(4, reader=1) is None
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(first.fetch(4, reader=2)))
    waiter.start()
    first.insert(4, make_item(4))  # worker 1's insert, through the parent
    first.send()
    waiter.join(timeout=WAIT_S + 10)
    assert not waiter.is_alive() and got[0] is not None
    assert_same(got[0], make_item(4))


def test_the_claims_of_a_worker_that_left_are_ended(pair, cache_name):
    first, second = pair
    assert first.fetch(7, reader=3) is None  # worker 3 claimed item 7 and exited unstored
    first.release(3)
    start = time.monotonic()
    assert second.fetch(7) is None  # another process reads it without waiting
    assert time.monotonic() - start < WAIT_S / 3
    claims = board(first.shared.config.namespace)
    assert ray.get(claims.claim.remote(cache_name, 7, "x"), timeout=30) == HELD  # second's
