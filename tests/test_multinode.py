"""raycache on a Ray cluster of several nodes (``ray.cluster_utils.Cluster`` on this machine).

Each node has its own raylet and object store (small ones) and one CPU, plus a custom
resource ``nodeK`` that pins a trainer to it. The provider logs every read with the node
it ran on, so the tests see where the preload read and how often the provider was read.
One cluster serves the module; the test that removes a node adds that node itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch.utils.data
from ray.cluster_utils import Cluster

import raycache
from raycache import CachedDataset, locality
from raycache.protocol import ROW_BITS

# Ray workers cannot import this module: ship its provider and trainer by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parent.parent
N = 1536
SHAPE = (3, 16, 16)  # 3 KiB of float32: a 64-item chunk (~196 KiB) goes to the node's store
CHUNK = 64
STORE_BYTES = 100 * 2**20
BATCH = 64
WAIT_S = 120


def expected_item(i: int) -> dict:
    """Item ``i``: values, dtypes and shapes a wrong read would not reproduce."""
    return {
        "image": np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + i,
        "flags": np.full(5, i % 251, dtype=np.uint8),
        "label": i,
        "object_id": f"obj-{i}",
    }


def item_mismatch(got: object, i: int) -> str | None:
    """Return what differs between ``got`` and item ``i``, or None when it is item ``i``."""
    want = expected_item(i)
    if not isinstance(got, dict) or set(got) != set(want):
        return f"{i}: not an item dict: {type(got).__name__}"
    for key in ("image", "flags"):
        a, b = np.asarray(got[key]), want[key]
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            return f"{i}.{key}: {a.dtype}{a.shape} != {b.dtype}{b.shape} or values differ"
    if got["label"] != i or got["object_id"] != want["object_id"]:
        return f"{i}: label/object_id {got['label']!r}/{got['object_id']!r}"
    return None


class NodeLoggingProvider:
    """A map-style dataset that appends ``node_id index`` to a file per process on each read."""

    def __init__(self, n: int, log_dir: str, latency_s: float = 0.0):
        self.n = n
        self.log_dir = log_dir
        self.latency_s = latency_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if self.latency_s:
            time.sleep(self.latency_s)  # a slow read, so that every preload task gets units
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
        with open(os.path.join(self.log_dir, f"{os.getpid()}.log"), "a") as f:
            f.write(f"{node} {int(i)}\n")
        return expected_item(int(i))


def provider_reads(log_dir: Path) -> dict[str, list[int]]:
    """Return the indices the provider read, per node id."""
    reads: dict[str, list[int]] = defaultdict(list)
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            node, idx = line.split()
            reads[node].append(int(idx))
    return dict(reads)


def read_count(log_dir: Path) -> int:
    return sum(len(v) for v in provider_reads(log_dir).values())


def read_epoch(provider: NodeLoggingProvider, config: dict, order: list[int]) -> dict:
    """Read ``order`` through a DataLoader over a ``CachedDataset``; check every item."""
    ds = CachedDataset(provider, config)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, sampler=order, collate_fn=lambda items: list(items)
    )
    bad, checked = [], 0
    for batch_indices, items in zip(_batches(order), loader):
        for i, item in zip(batch_indices, items):
            problem = item_mismatch(item, i)
            if problem:
                bad.append(problem)
            checked += 1
    client = ds.cache.stats()["client"]
    ds.cache.close()
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "bad": bad[:5],
        "checked": checked,
        "hits": client["hits"],
        "misses": client["misses"],
        "read_bytes": client["read_bytes"],
        "crossed_bytes": client["crossed_bytes"],
    }


def _batches(order: list[int]) -> list[list[int]]:
    return [order[s : s + BATCH] for s in range(0, len(order), BATCH)]


@ray.remote(num_cpus=0)
def read_epoch_task(provider: NodeLoggingProvider, config: dict, order: list[int]) -> dict:
    """``read_epoch`` as a trainer on whichever node the task is pinned to."""
    return read_epoch(provider, config, order)


@ray.remote(num_cpus=1)
def _warm_worker() -> str:
    return ray.get_runtime_context().get_node_id()


def node_ids() -> dict[str, str]:
    """Return the node id of each live node, by its ``nodeK`` resource."""
    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            for key in node["Resources"]:
                if re.fullmatch(r"node\d+", key):
                    out[key] = node["NodeID"]
    return out


def warm_workers(names: list[str]) -> None:
    """Start a worker process on each node now, so that preload tasks start together."""
    ray.get([_warm_worker.options(resources={k: 0.01}).remote() for k in names], timeout=WAIT_S)


def cache_config(name: str, tasks: int = 3, **raycache_keys: object) -> dict:
    # One preload task per thread up to the cluster's CPUs: with 1 CPU per node, one per node.
    return {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": tasks},
        "raycache": {"name": name, "chunk_size": CHUNK, "timeout_s": 30.0, **raycache_keys},
    }


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, 1 CPU and a 100 MiB object store each."""
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": STORE_BYTES,
            "resources": {"node0": 1},
            "include_dashboard": False,
            # A node that is killed is declared dead in ~2 s, not Ray's default ~30 s.
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        },
    )
    try:
        for k in (1, 2):
            c.add_node(num_cpus=1, object_store_memory=STORE_BYTES, resources={f"node{k}": 1})
        c.wait_for_nodes(timeout=WAIT_S)
        ray.init(address=c.address, logging_level=logging.WARNING)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def name() -> str:
    return f"mn-{uuid.uuid4().hex[:10]}"


def test_preload_spreads_over_nodes_and_a_trainer_on_each_node_reads_every_item(
    cluster, name, tmp_path, record_property
):
    nodes = node_ids()
    assert len(nodes) == 3
    warm_workers(list(nodes))
    provider = NodeLoggingProvider(N, str(tmp_path), latency_s=0.002)
    config = cache_config(name)
    ds = CachedDataset(provider, config)
    assert ds.cache.wait_for_preload(timeout=WAIT_S)
    stats = ds.cache.stats()
    assert stats["items"] == N and stats["preload_errors"] == []

    reads = provider_reads(tmp_path)
    assert sorted(i for v in reads.values() for i in v) == list(range(N))  # each read once
    # Each node ran a preload task: its reads were made there.
    assert set(reads) == set(nodes.values()), {k: len(v) for k, v in reads.items()}

    order = np.random.default_rng(0).permutation(N).tolist()
    crossed = {}
    for k in ("node1", "node2", "node1"):
        result = ray.get(
            read_epoch_task.options(resources={k: 0.01}).remote(provider, config, order),
            timeout=WAIT_S,
        )
        assert result["node"] == nodes[k]
        assert result["bad"] == []
        assert result["checked"] == N
        assert (result["hits"], result["misses"]) == (N, 0)
        assert result["read_bytes"] == stats["bytes"]  # every chunk mapped once
        crossed.setdefault(k, []).append(result["crossed_bytes"])
        # Every chunk now has a copy in this node's store.
        assert all(nodes[k] in homes for homes in locality.chunk_nodes(ds.cache).values())
    assert read_count(tmp_path) == N  # the trainers read the provider 0 times
    # Without locality a node's first warm epoch copies the other nodes' chunks over...
    for k in ("node1", "node2"):
        assert 0 < crossed[k][0] < stats["bytes"], crossed
    record_property("crossed_bytes_first_epoch_locality_off", crossed)
    # ...and a later epoch there (another process) reads that node's store: nothing crosses.
    assert crossed["node1"][1] == 0, crossed
    totals = ds.cache.stats()
    assert totals["crossed_bytes"] == crossed["node1"][0] + crossed["node2"][0]
    assert totals["node_read_bytes"][nodes["node1"]] == 2 * stats["bytes"]
    ds.cache.close()
    raycache.drop_cache(name)


def test_detached_cache_outlives_its_job_and_the_next_job_attaches_warm(cluster, name, tmp_path):
    # Three successive driver processes against the cluster, as a sweep's jobs would be:
    # the first fills a detached cache and exits, the second reads it warm, the third
    # (another length) is refused.
    def job(n: int, expect_rc: int = 0) -> dict:
        before = read_count(tmp_path)
        proc = subprocess.run(
            [sys.executable, "-c", SWEEP_JOB, cluster.address, name, str(tmp_path), str(n)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert proc.returncode == expect_rc, proc.stdout + proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["provider_reads"] = read_count(tmp_path) - before
        return out

    first = job(N)
    assert first["items"] == N and first["bad"] == []
    assert first["provider_reads"] == N  # the preload read each item once
    assert name in raycache.list_caches()  # the job has ended; its cache has not

    second = job(N)
    assert second["bad"] == [] and second["checked"] == N
    assert second["provider_reads"] == 0
    assert (second["hits"], second["misses"]) == (N, 0)

    third = job(N + 1, expect_rc=3)
    # Caught as raycache.CacheMismatchError (exit 3); its type is Ray's remote-error
    # subclass of it, RayTaskError(CacheMismatchError), today.
    assert "CacheMismatchError" in third["error"]
    assert f"holds {N} items" in third["message"] and f"{N + 1} items" in third["message"]
    assert third["provider_reads"] == 0
    assert raycache.drop_cache(name)


# A training job of a sweep: its provider is defined in the script itself (``__main__``).
SWEEP_JOB = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import ray
    import raycache

    address, name, log_dir, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class SweepProvider:
        def __init__(self, n, log_dir):
            self.n, self.log_dir = n, log_dir
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            with open(os.path.join(self.log_dir, f"{os.getpid()}.log"), "a") as f:
                f.write(f"{ray.get_runtime_context().get_node_id()} {i}\\n")
            return {"image": np.full((3, 16, 16), i, dtype=np.float32), "label": i}

    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 3},
        "raycache": {"name": name, "address": address, "detached": True, "chunk_size": 64},
    }
    try:
        ds = raycache.CachedDataset(SweepProvider(n, log_dir), config)
    except raycache.CacheMismatchError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(3)
    if not ds.cache.wait_for_preload(timeout=120):
        sys.exit("preload did not end in 120 s")
    bad, checked = [], 0
    for i in np.random.default_rng(1).permutation(n).tolist():
        item = ds[i]
        want = np.full((3, 16, 16), i, dtype=np.float32)
        image = item["image"]
        if image.dtype != want.dtype or image.shape != want.shape or not (image == want).all():
            bad.append(i)
        if item["label"] != i:
            bad.append(i)
        checked += 1
    stats = ds.cache.stats()
    print(json.dumps({
        "items": stats["items"], "bad": bad[:5], "checked": checked,
        "hits": stats["client"]["hits"], "misses": stats["client"]["misses"],
    }))
    """
)


def test_locality_builds_each_chunk_on_its_node_and_a_warm_epoch_crosses_nothing(
    cluster, name, tmp_path
):
    nodes = node_ids()
    warm_workers(list(nodes))
    provider = NodeLoggingProvider(N, str(tmp_path))
    config = cache_config(name, locality="nodes")
    ds = CachedDataset(provider, config)
    assert ds.cache.wait_for_preload(timeout=WAIT_S)
    stats = ds.cache.stats()
    assert stats["items"] == N and stats["preload_errors"] == []
    share = {k: locality.node_indices(ds.cache, nodes[k]) for k in nodes}
    # The plan: equal blocks over the nodes, every index once.
    assert sorted(np.concatenate(list(share.values())).tolist()) == list(range(N))
    assert {len(v) for v in share.values()} == {N // 3}
    # Each node's share was read by the preload on that node...
    reads = provider_reads(tmp_path)
    for k, node in nodes.items():
        assert sorted(reads[node]) == share[k].tolist(), k
    # ...and its chunks were stored there only.
    client = ds.cache.attach()
    loc = client.inspect().locations
    homes = locality.chunk_nodes(ds.cache)
    for k, node in nodes.items():
        cids = set((loc[share[k]] >> ROW_BITS).tolist())
        assert all(homes[c] == {node} for c in cids), (k, [homes[c] for c in cids])

    rng = np.random.default_rng(3)
    for k in ("node1", "node2"):
        order = rng.permutation(share[k]).tolist()
        result = ray.get(
            read_epoch_task.options(resources={k: 0.01}).remote(provider, config, order),
            timeout=WAIT_S,
        )
        assert result["bad"] == [] and (result["hits"], result["misses"]) == (len(order), 0)
        assert result["read_bytes"] > 0
        assert result["crossed_bytes"] == 0, k
    totals = ds.cache.stats()
    assert totals["crossed_bytes"] == 0
    assert totals["node_read_bytes"][nodes["node1"]] > 0
    assert totals["node_read_bytes"][nodes["node2"]] > 0
    assert read_count(tmp_path) == N
    ds.cache.close()
    raycache.drop_cache(name)


def read_losing_node(
    ds: CachedDataset, order: list[int], lost: set[int], remove: Callable[[], None]
) -> tuple[list[str], int]:
    """Read ``order`` in batches, calling ``remove`` just before the first of ``lost``.

    Returns what was wrong with the items read, and how many were checked.
    """
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, sampler=order, collate_fn=lambda items: list(items)
    )
    bad, checked, removed = [], 0, False
    batches = _batches(order)
    for b, items in enumerate(loader):
        for i, item in zip(batches[b], items):
            problem = item_mismatch(item, i)
            if problem:
                bad.append(problem)
            checked += 1
        if not removed and b + 1 < len(batches) and lost & set(batches[b + 1]):
            # Mid-epoch, before any of the node's items was read: a DataLoader with no
            # workers reads a batch only when it is asked for the next one.
            remove()
            removed = True
    assert removed, "no batch held a lost item"
    return bad, checked


def test_a_chunk_lost_with_its_node_is_read_again_and_refilled(cluster, name, tmp_path):
    # The cache's directory actor starts before the doomed node joins, so it cannot be
    # placed there: this test is about losing chunks, not the directory.
    provider = NodeLoggingProvider(N, str(tmp_path))
    config = cache_config(name)
    config["data_set"]["preload_cache"] = False
    ds = CachedDataset(provider, config)
    doomed = cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES, resources={"node3": 1})
    cluster.wait_for_nodes(timeout=WAIT_S)
    nodes = node_ids()
    assert len(nodes) == 4
    warm_workers(list(nodes))
    # A user-given plan: the doomed node preloads the first quarter, node1 the rest.
    lost = list(range(N // 4))
    kept = list(range(N // 4, N))
    plan = locality.LocalityPlan.from_mapping(N, {nodes["node3"]: lost, nodes["node1"]: kept})
    locality.preload_on_nodes(ds.cache, provider, plan)
    assert ds.cache.wait_for_preload(timeout=WAIT_S)
    assert ds.cache.stats()["items"] == N
    assert sorted(provider_reads(tmp_path)[nodes["node3"]]) == lost
    # The only copy of the first quarter's chunks is on the doomed node.
    client = ds.cache.attach()
    loc = client.inspect().locations
    homes = locality.chunk_nodes(ds.cache)
    lost_cids = set((loc[lost] >> ROW_BITS).tolist())
    assert all(homes[c] == {nodes["node3"]} for c in lost_cids)

    rng = np.random.default_rng(2)
    # The epoch reads the other items first, then the node goes, then its items.
    order = rng.permutation(kept).tolist() + rng.permutation(lost).tolist()
    reads_before_loss = read_count(tmp_path)
    remove = lambda: cluster.remove_node(doomed, allow_graceful=False)  # noqa: E731
    bad, checked = read_losing_node(ds, order, set(lost), remove)
    assert bad == [] and checked == N
    assert not client.dead  # one lost chunk is not a lost cache
    # Every lost item was read from the provider once, on this node, and stored again.
    assert read_count(tmp_path) - reads_before_loss == len(lost)
    stats = ds.cache.stats()
    assert stats["lost_chunks"] == len(lost_cids)
    assert stats["items"] == N
    # The next epoch is all hits, from a process that knew nothing of the loss too.
    result = ray.get(
        read_epoch_task.options(resources={"node2": 0.01}).remote(provider, config, order),
        timeout=WAIT_S,
    )
    assert result["bad"] == [] and (result["hits"], result["misses"]) == (N, 0)
    assert read_count(tmp_path) - reads_before_loss == len(lost)
    ds.cache.close()
    raycache.drop_cache(name)
    # Ray itself declares the node dead (health checks): wait for it, with a timeout.
    deadline = time.monotonic() + WAIT_S
    while "node3" in node_ids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert node_ids().keys() == {"node0", "node1", "node2"}
