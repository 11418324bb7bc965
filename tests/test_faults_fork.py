"""Forked DataLoader workers and a preload: they read the cache, and their reads count.

A forked worker makes no Ray call (Ray is not fork-safe). Workers forked once the preload
has stored the items read them from the chunks mapped at the fork, not from the
provider, and the hits and misses they count reach the parent's ``stats()`` through the
pipe that carries their inserts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from fault_helpers import assert_same_item
from providers import ArrayProvider, LoggedReadsProvider

import raycache
from raycache import CachedDataset

N = 256
REPO = Path(__file__).resolve().parent.parent


def _epoch(ds, provider) -> int:
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=32,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=list,
        timeout=120,
    )
    read = 0
    for k, batch in enumerate(loader):
        for j, item in enumerate(batch):
            assert_same_item(item, provider[32 * k + j], f"item {32 * k + j}")
            read += 1
    return read


def test_fork_workers_read_the_preloaded_cache_and_are_counted(ray_address, cache_name, tmp_path):
    provider = LoggedReadsProvider(N, str(tmp_path / "reads.log"))
    config = {
        "data_set": {"preload_cache": True, "preload_threads": 2},
        "raycache": {"name": cache_name, "chunk_size": 32},
    }
    ds = CachedDataset(provider, config)
    assert ds.cache.wait_for_preload(timeout=120)
    preload_reads = len(provider.reads())
    assert preload_reads >= N
    before = ds.cache.stats()

    assert _epoch(ds, provider) == N  # workers forked after the preload ended
    # Reads by this process are the check's own (provider[...]); the workers made none.
    elsewhere = len(provider.reads()) - len(provider.reads(os.getpid()))
    assert elsewhere == preload_reads, "a worker read the provider"
    after = ds.cache.stats()
    assert after["client"]["hits"] - before["client"]["hits"] == N
    assert after["client"]["misses"] == before["client"]["misses"]
    deadline = time.monotonic() + 30  # the counts reach the actor with the next beat
    while ds.cache.stats()["hits"] - before["hits"] < N:
        assert time.monotonic() < deadline, "the workers' hits never reached the cache"
        time.sleep(0.1)
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_a_forked_child_asking_about_the_preload_gets_a_clear_error(ray_address, cache_name):
    ds = CachedDataset(ArrayProvider(64), {"raycache": {"name": cache_name, "chunk_size": 32}})
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Ray call may happen here
        os.close(read_fd)
        lines = []
        for call in (lambda: ds.cache.wait_for_preload(timeout=5), ds.cache.stats):
            try:
                call()
                lines.append("no error")
            except Exception as exc:
                lines.append(f"{type(exc).__name__}: {exc}")
        os.write(write_fd, "\n".join(lines).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 2, out
    for line in lines:
        assert line.startswith("CacheUnavailableError") and "forked" in line, out
    assert ds.cache.stats()["name"] == cache_name  # this process's Ray is unharmed
    ds.cache.close()
    raycache.drop_cache(cache_name)


def test_a_forked_child_leaves_the_inherited_heap_to_the_parent(ray_address, cache_name):
    """The objects alive at the fork are frozen in the child only: its cycle collector
    never writes to (and so never copies) the pages it shares with the parent."""
    import gc

    ds = CachedDataset(ArrayProvider(64), {"raycache": {"name": cache_name, "chunk_size": 32}})
    assert gc.get_freeze_count() == 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.write(write_fd, str(gc.get_freeze_count()).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        frozen_in_child = int(pipe.read() or "0")
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert frozen_in_child > 1000, "the child's collector would scan the inherited heap"
    assert gc.get_freeze_count() == 0, "the parent's objects stayed frozen after the fork"
    ds.cache.close()
    raycache.drop_cache(cache_name)


EXIT_WITH_PERSISTENT_WORKERS = """
import numpy as np, torch
from raycache import CachedDataset

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": np.full(4, float(i), dtype=np.float32)}

ds = CachedDataset(Items(), {"data_set": {"use_cache": True}, "raycache": {"name": NAME}})
loader = torch.utils.data.DataLoader(
    ds, batch_size=8, num_workers=2, multiprocessing_context="fork",
    persistent_workers=True, collate_fn=ds.collate, timeout=120,
)
for epoch in range(2):
    assert sum(len(b["x"]) for b in loader) == 64
print("done", flush=True)
"""


def test_exit_with_persistent_fork_workers_alive_is_quiet(ray_address, cache_name):
    # The workers close their sockets while the interpreter shuts down: the parent's
    # fork server must not try to start work then (it raised in its thread).
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=str(REPO))
    code = f"NAME = {cache_name!r}\n" + EXIT_WITH_PERSISTENT_WORKERS
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    try:
        assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
        assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, (
            proc.stderr
        )
    finally:
        raycache.drop_cache(cache_name)
