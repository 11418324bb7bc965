"""The parts of cluster jobs that need no cluster: plans, lost chunks, byte counts, units.

The multi-node behaviour is in ``tests/test_multinode.py``; these check the rules the
pieces follow alone (a plan covers every index once, a lost chunk unmaps exactly its
indices, units follow the node's indices in order).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import ray
import torch.utils.data
from providers import LoggedReadsProvider, make_item
from ray.exceptions import ObjectLostError, ObjectReconstructionFailedError, OwnerDiedError

import raycache
from raycache import locality
from raycache.chunk_loss import LostEvent, forget_chunk, is_chunk_loss, unmap_lost
from raycache.directory_map import ChunkMap
from raycache.locality import LocalityPlan
from raycache.locality_preload import NodeUnits
from raycache.node_bytes import NodeBytes
from raycache.protocol import MISSING, pack_locations

NODES = ["a" * 56, "b" * 56, "c" * 56]


def test_block_plan_gives_each_node_an_equal_contiguous_block():
    plan = LocalityPlan.blocks(10, NODES)
    shares = [plan.indices_on(n).tolist() for n in NODES]
    assert shares == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan.indices_on("unknown").tolist() == []


class _Stub(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> int:
        return i


def test_rank_plan_is_what_distributed_sampler_gives_each_rank():
    # Four ranks, two per node, in torchrun's order: node of rank r is r // 2.
    node_of_rank = [NODES[0], NODES[0], NODES[1], NODES[1]]
    plan = LocalityPlan.from_ranks(11, node_of_rank)
    for rank, node in enumerate(node_of_rank):
        sampler = torch.utils.data.DistributedSampler(
            _Stub(), num_replicas=4, rank=rank, shuffle=False
        )
        # Only the padding (the first indices again, here one) may be planned elsewhere.
        assert set(sampler) - set(plan.indices_on(node).tolist()) <= {0}, rank
    together = np.concatenate([plan.indices_on(n) for n in NODES[:2]])
    assert sorted(together.tolist()) == list(range(11))


def test_mapping_plan_names_the_index_given_twice_or_to_no_node():
    plan = LocalityPlan.from_mapping(6, {NODES[0]: [0, 1, 2], NODES[1]: np.array([3, 4, 5])})
    assert plan.indices_on(NODES[1]).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="index 2 is given more than once"):
        LocalityPlan.from_mapping(6, {NODES[0]: [0, 1, 2], NODES[1]: [2, 3, 4, 5]})
    with pytest.raises(ValueError, match="index 4 is given more than once"):
        LocalityPlan.from_mapping(6, {NODES[0]: [0, 1, 2, 3, 4, 4, 5]})
    with pytest.raises(ValueError, match=r"index 5 \(and 0 more\) is given to no node"):
        LocalityPlan.from_mapping(6, {NODES[0]: [0, 1, 2], NODES[1]: [3, 4]})
    with pytest.raises(ValueError, match=r"index 6 is not in \[0, 6\)"):
        LocalityPlan.from_mapping(6, {NODES[0]: [0, 1, 2, 3, 4, 5, 6]})
    with pytest.raises(ValueError, match="distinct node ids"):
        LocalityPlan([NODES[0], NODES[0]], np.zeros(3))


def _map_with_two_chunks() -> ChunkMap:
    chunk_map = ChunkMap(10, 10**6, 64, 2**20)
    chunk_map.register("ref-0", np.array([0, 2, 4, 6]), 400)
    chunk_map.register("ref-1", np.array([1, 3, 5]), 300)
    return chunk_map


def test_a_lost_chunk_unmaps_its_indices_once_and_leaves_the_others():
    chunk_map = _map_with_two_chunks()
    version = chunk_map.version
    event = forget_chunk(chunk_map, 0)
    assert isinstance(event, LostEvent) and event.indices.tolist() == [0, 2, 4, 6]
    assert chunk_map.cached(np.arange(7)).tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert (chunk_map.items, chunk_map.nbytes, list(chunk_map.refs)) == (3, 300, [1])
    assert chunk_map.version == version + 1
    assert forget_chunk(chunk_map, 0) is None  # a second report changes nothing
    assert chunk_map.version == version + 1
    # The lost indices can be stored again (the refill).
    cid, added = chunk_map.register("ref-2", np.array([0, 2]), 200)
    assert added == 2 and chunk_map.cached(np.array([0, 2])).all()


def test_a_client_unmaps_only_indices_still_in_the_lost_chunk():
    loc = np.full(10, MISSING, dtype=np.int64)
    loc[[0, 2, 4]] = pack_locations(0, np.array([0, 1, 2]))
    loc[6] = pack_locations(5, np.array([0]))[0]  # moved elsewhere since
    unmap_lost(loc, LostEvent(0, np.array([0, 2, 4, 6])))
    assert (loc[[0, 2, 4]] == MISSING).all()
    assert loc[6] == pack_locations(5, np.array([0]))[0]


def test_only_lost_object_errors_other_than_the_owners_death_are_a_chunk_loss():
    assert is_chunk_loss(ObjectLostError("00" * 28, "owner", "call site"))
    assert is_chunk_loss(ObjectReconstructionFailedError("00" * 28, "owner", "call site"))
    assert not is_chunk_loss(OwnerDiedError("00" * 28, "owner", "call site"))
    assert not is_chunk_loss(TimeoutError("slow"))


def test_node_units_follow_the_node_indices_and_size_by_bytes():
    units = NodeUnits(np.array([5, 9, 11, 40, 41, 42, 50, 60]), None, chunk_bytes=300)
    key, first = units.claim(None)
    assert key == 0 and first.tolist() == [5, 9, 11, 40, 41, 42, 50, 60]  # a probe of 32
    units = NodeUnits(np.arange(100, 140), None, chunk_bytes=1000)
    assert len(units.claim(None)[1]) == 32
    # 32 rows of 100 bytes came back: the next units hold 1000 // 100 = 10 rows.
    key, second = units.claim((32, 3200, 0.01))
    assert key == 1 and second.tolist() == list(range(132, 140))
    assert units.claim((8, 800, 0.01)) is None
    fixed = NodeUnits(np.arange(10), 4, chunk_bytes=2**20)
    assert [u.tolist() for _, u in iter(lambda: fixed.claim(None), None)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_node_bytes_add_up_per_node_and_crossed():
    table = NodeBytes()
    table.add("n1", 100, 60)
    table.add("n1", 50, 0)
    table.add("n2", 70, 70)
    assert table.report() == {
        "node_read_bytes": {"n1": 150, "n2": 70},
        "node_crossed_bytes": {"n1": 60, "n2": 70},
        "crossed_bytes": 130,
    }


# ------------------------------------------------------------------ on one node's Ray
def test_a_trainer_reading_during_a_locality_preload_gets_every_item(ray_address, tmp_path):
    # On one node the plan is one block; what is checked is the run's side of the
    # protocol: trainers that read while it runs wait for or read each item, and the
    # cache ends whole.
    n = 640
    provider = LoggedReadsProvider(n, str(tmp_path / "reads.log"), latency_s=0.002)
    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 4},
        "raycache": {"name": f"loc-{uuid.uuid4().hex[:8]}", "chunk_size": 64, "locality": "nodes"},
    }
    ds = raycache.CachedDataset(provider, config)
    order = np.random.default_rng(4).permutation(n).tolist()
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=order, collate_fn=list)
    got = [item for batch in loader for item in batch]
    for i, item in zip(order, got):
        assert item["data"]["label"] == i and item["object_id"] == f"obj-{i}"
        np.testing.assert_array_equal(item["data"]["image"], make_item(i)["data"]["image"])
    assert ds.cache.wait_for_preload(timeout=60)
    stats = ds.cache.stats()
    assert stats["preload"]["state"] == "done" and stats["items"] == n
    assert stats["preload"]["nodes"] == {ray.get_runtime_context().get_node_id(): n}
    assert locality.node_indices(ds.cache).tolist() == list(range(n))
    assert sorted(set(provider.reads())) == list(range(n))
    before = len(provider.reads())
    again = [item for batch in loader for item in batch]
    assert [item["data"]["label"] for item in again] == order
    assert len(provider.reads()) == before  # warm: the provider is not read again
    assert stats["crossed_bytes"] == 0  # one node: nothing can cross
    ds.cache.close()
    raycache.drop_cache(config["raycache"]["name"])
