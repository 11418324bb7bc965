"""Chunk bytes each process maps reach the cache's totals, once, while it runs and at its end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import TESTS
from providers import ArrayProvider, make_item

import raycache
from raycache import DataCache

N = 240  # in chunks of 4 items: 60 chunks, mapped by each reader

READER = """
import sys
import raycache
from providers import ArrayProvider
config = {{"raycache": {{"name": "{name}", "chunk_size": 4}}}}
cache = raycache.DataCache(config, ArrayProvider({n}))
for start in range(0, {n}, 48):
    batch = cache.fetch_many(list(range(start, min(start + 48, {n}))))
    assert all(item is not None for item in batch)
print("mapped", flush=True)
{wait}
print("read_bytes", cache.stats()["client"]["read_bytes"], flush=True)
cache.close()
"""


@pytest.fixture
def filled(ray_address, cache_name):
    cache = DataCache({"raycache": {"name": cache_name, "chunk_size": 4}}, ArrayProvider(N))
    cache.insert_many(list(range(N)), [make_item(i) for i in range(N)])
    assert cache.flush(timeout=30)
    try:
        yield cache
    finally:
        cache.close()
        raycache.drop_cache(cache_name)


def reader(address, name, wait=""):
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=f"{TESTS}{os.pathsep}{TESTS.parent}")
    code = textwrap.dedent(READER.format(name=name, n=N, wait=wait))
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def mapped_bytes(cache):
    return sum(cache.stats()["node_read_bytes"].values())


def test_each_process_that_maps_the_chunks_is_counted_once(ray_address, filled):
    total = filled.stats()["bytes"]
    assert mapped_bytes(filled) == 0  # the process that filled it mapped nothing
    for k in (1, 2):
        proc = reader(ray_address, filled.name)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert f"read_bytes {total}" in out
        assert mapped_bytes(filled) == k * total


def test_bytes_mapped_reach_the_totals_while_the_process_runs(ray_address, filled):
    # Counts are sent summed over a while; the reader's heartbeat sends what is left,
    # without a stats() or close() of its own.
    total = filled.stats()["bytes"]
    proc = reader(ray_address, filled.name, wait="sys.stdin.readline()")
    try:
        assert proc.stdout.readline().strip() == "mapped"
        deadline = time.monotonic() + 30
        while mapped_bytes(filled) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mapped_bytes(filled) == total
        out, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, err
        assert f"read_bytes {total}" in out
        assert mapped_bytes(filled) == total  # nothing counted twice at the end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
