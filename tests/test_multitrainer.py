"""Several trainers on one node share one cache: torchrun ranks and DataLoader workers.

Every test trains the same loop (``raycache.tools.train.loop``) and checks, per rank and per
epoch, that the rank received exactly its ``DistributedSampler`` shard (shuffle=True,
``set_epoch``), in order, with the values the provider holds, and that the ranks'
shards together cover the dataset (``ranks.check_ranks``). Ray Train workers are checked
the same way where the example runs as users run it, as a job submitted to a cluster
(``test_cluster_job.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import local_ray
from providers import LoggedReadsProvider
from ranks import check_ranks

from raycache import CachedDataset, cache_stats, drop_cache
from raycache.tools.train.data import SyntheticCutouts
from raycache.tools.train.loop import LoopSettings, train

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 384
EPOCHS = 2
RUN_TIMEOUT_S = 420
STORE_BYTES = 512 * 1024 * 1024


@pytest.fixture(scope="module")
def ray_address():
    # A Ray of the module's own: a store of STORE_BYTES, which the test of segments
    # compacted after a fork fills for the store to reuse their memory.
    with local_ray(num_cpus=2, object_store_memory=STORE_BYTES) as address:
        yield address


def _run(cmd: list[str], result_dir: Path, world: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-6000:])
    return [json.loads((result_dir / f"rank-{r}.json").read_text()) for r in range(world)]


def test_torchrun_ddp_two_ranks_share_one_cache(ray_address, tmp_path):
    name = "mt-torchrun"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "examples/ddp_torchrun.py", "--items", str(ITEMS), "--epochs", str(EPOCHS),
        "--batch-size", "32", "--address", ray_address, "--name", name,
        "--result-dir", str(tmp_path),
    ]  # fmt: skip
    try:
        ranks = _run(cmd, tmp_path, 2)
        check_ranks(ranks, ITEMS, 2, EPOCHS)
        for result in ranks:
            assert result["stats"]["clients"] == 2  # both ranks attached to the one cache
        # The ranks may finish reading before the preload has ended (it skips what the
        # ranks stored, but its tasks still have to run): wait for it, with a timeout.
        watcher = CachedDataset(SyntheticCutouts(ITEMS), {"raycache": {"name": name}})
        assert watcher.cache.wait_for_preload(timeout=120)
        watcher.cache.close()
        stats = cache_stats(name)
        assert stats["preload"]["state"] == "done"
        # Each item was stored once: by the one preload, or by the rank that needed it
        # before the preload reached it (the preload skips what is cached by then). How
        # the items split between the two is timing: on a loaded machine the ranks can
        # read every item before the preload's first task is scheduled.
        assert stats["items"] == ITEMS
        assert stats["preloaded_items"] + stats["inserted_items"] == ITEMS
        assert stats["preloaded_items"] <= stats["preload"]["loaded"] <= ITEMS
    finally:
        drop_cache(name)


def _loader_run(name: str, start_method: str, preload: bool) -> tuple[CachedDataset, dict]:
    provider = SyntheticCutouts(ITEMS)
    ds = CachedDataset(
        provider,
        {"data_set": {"preload_cache": preload}, "raycache": {"name": name, "timeout_s": 120}},
    )
    settings = LoopSettings(
        epochs=EPOCHS,
        batch_size=32,
        num_workers=2,
        start_method=start_method,
        record_indices=True,
        memory=False,
    )
    records = train(ds, settings)
    return ds, {"rank": 0, "epochs": records}


def _ray_alive() -> None:
    @ray.remote(num_cpus=0)
    def ping() -> int:
        return 7

    assert ray.get(ping.remote(), timeout=60) == 7


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_forked_dataloader_workers(ray_address, preload):
    # The obvious DataLoader(CachedDataset(...), num_workers=2) with Linux's default
    # start method: forked workers must make no Ray call (that killed the raylet).
    name = f"mt-fork-{preload}"
    try:
        ds, result = _loader_run(name, "fork", preload)
        check_ranks([result], ITEMS, 1, EPOCHS)
        _ray_alive()  # the raylet survived the forked workers
        stats = ds.cache.stats()  # and this process still talks to the cache
        if preload:
            assert ds.cache.wait_for_preload(timeout=120)
            assert ds.cache.stats()["items"] == ITEMS
        else:
            # Forked workers make no Ray call; the items they read reached the cache
            # through this process (raycache.relay).
            assert stats["items"] == ITEMS
        ds.cache.close()
    finally:
        drop_cache(name)


def test_forked_workers_fill_the_cache_and_next_epoch_reads_it(ray_address, tmp_path):
    name = "mt-fork-relay"
    provider = LoggedReadsProvider(300, str(tmp_path / "reads.log"))
    ds = CachedDataset(provider, {"raycache": {"name": name, "timeout_s": 120}})
    ds.cache.stats()  # attached before the fork, as a training script is after its first use
    try:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=16, shuffle=True, num_workers=2, multiprocessing_context="fork"
        )
        for epoch in range(2):
            seen = []
            for batch in loader:
                labels = batch["data"]["label"].tolist()
                assert batch["data"]["image"][:, 0, 0, 0].tolist() == [float(x) for x in labels]
                seen += labels
            assert sorted(seen) == list(range(300)), epoch
            if epoch == 0:
                assert sorted(provider.reads()) == list(range(300))  # epoch 1: all misses
                assert ds.cache.flush(timeout=60)
                assert ds.cache.stats()["items"] == 300
        # Epoch 2's workers, forked after the parent mapped the new chunks, read none.
        assert len(provider.reads()) == 300
        _ray_alive()
    finally:
        ds.cache.close()
        drop_cache(name)


class _BlockingSampler(torch.utils.data.Sampler):
    """Yields ``order`` once ``go`` is set; sets ``started`` when iterated (after the fork)."""

    def __init__(self, order: list[int]):
        self.order = order
        self.started = threading.Event()
        self.go = threading.Event()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        self.started.set()
        assert self.go.wait(120), "the test's other thread never let the sampler go on"
        yield from self.order


def test_forked_workers_read_segments_compacted_after_their_fork(ray_address):
    # A forked worker reads the chunks mapped at its fork through inherited memory. If
    # the parent then learns that they were compacted and lets them go, the store reuses
    # their memory: the worker served the bytes of later objects as items (2026-12-02).
    name = "mt-fork-compacted"
    provider = SyntheticCutouts(24)
    ds = CachedDataset(provider, {"raycache": {"name": name, "chunk_size": 8, "timeout_s": 120}})
    try:
        for i in range(3):  # a small segment, mapped in the parent before the fork
            ds.cache.insert_into_cache(i, provider[i])
        assert ds.cache.flush(timeout=60)
        assert ds.cache.try_fetch(0) is not None
        sampler = _BlockingSampler([0, 1, 2])
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=sampler, num_workers=1, multiprocessing_context="fork"
        )
        failures: list[BaseException] = []
        junk: list = []

        def compact_and_churn() -> None:
            try:
                assert sampler.started.wait(120), "the DataLoader never started"
                for i in range(3, 12):  # more segments: the first one is compacted away
                    ds.cache.insert_into_cache(i, provider[i])
                    if i % 3 == 2:
                        assert ds.cache.flush(timeout=60)  # the reply carries the retire
                assert ds.cache.stats()["chunks"] < 4
                assert ds.cache.client.inspect().pins_held >= 1  # retired, held for the worker
                # New objects of the segment's size filling most of the store: where its
                # memory is free, the store reuses it.
                shape = (3, *provider[0]["image"].shape)
                count = int(0.6 * STORE_BYTES) // (4 * int(np.prod(shape)))
                junk.extend(ray.put(np.full(shape, -7.0, np.float32)) for _ in range(count))
            except BaseException as exc:
                failures.append(exc)
            finally:
                sampler.go.set()

        thread = threading.Thread(target=compact_and_churn)
        thread.start()
        got = {int(item["index"]): item["image"].numpy() for item in loader}
        thread.join(timeout=120)
        assert not failures, failures
        assert sorted(got) == [0, 1, 2]
        for i, image in got.items():
            np.testing.assert_array_equal(image, provider.expected(i)["image"])
        # The worker has exited with its iterator: the parent lets the segment go.
        client = ds.cache.client
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = client.inspect()
            if not (state.pins_held or state.pin_children):
                break
            time.sleep(0.05)
        state = client.inspect()
        assert (state.pins_held, state.pin_children) == (0, 0)
    finally:
        ds.cache.close()
        drop_cache(name)


def test_spawned_dataloader_workers_attach_by_name(ray_address):
    name = "mt-spawn"
    try:
        ds, result = _loader_run(name, "spawn", preload=False)
        check_ranks([result], ITEMS, 1, EPOCHS)
        _ray_alive()
        # Spawned workers are full clients: their epoch-1 misses filled the cache.
        assert ds.cache.flush(timeout=60)
        assert cache_stats(name)["items"] == ITEMS
        ds.cache.close()
    finally:
        drop_cache(name)
