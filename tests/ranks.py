"""Checks of what training ranks report: each rank read exactly its shard, every epoch.

The training loop (``raycache.tools.train.loop``) records, per epoch, the indices a rank
received and whether their values matched the provider; the examples and the demo write
those records per rank. ``check_ranks`` compares them with ``DistributedSampler``'s shards
(shuffle=True, ``set_epoch``), so every test that trains ranks asserts the same thing.
"""

from __future__ import annotations

from torch.utils.data import DistributedSampler


def shard(length: int, world: int, rank: int, epoch: int) -> list[int]:
    """Return the indices ``DistributedSampler`` gives ``rank`` in ``epoch`` (shuffled)."""
    sampler = DistributedSampler(range(length), num_replicas=world, rank=rank, shuffle=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def check_ranks(ranks: list[dict], length: int, world: int, epochs: int) -> None:
    """Assert every rank saw exactly its shard, in order, with the right values, every epoch."""
    assert sorted(r["rank"] for r in ranks) == list(range(world))
    for epoch in range(epochs):
        covered: set[int] = set()
        for result in ranks:
            got = result["epochs"][epoch]["shard"]
            want = shard(length, world, result["rank"], epoch)
            assert got["indices"] == want, f"rank {result['rank']} epoch {epoch + 1}"
            assert got["seen"] == got["expected"] == len(want)
            assert got["order_errors"] == 0
            assert got["verified"] and got["bad_values"] == 0
            covered |= set(got["indices"])
        assert covered == set(range(length))
