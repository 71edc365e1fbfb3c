"""ShardSampler: exactly-once evaluation shards."""

from __future__ import annotations

from lance_cookbook import ShardSampler


def test_shard_sampler_partitions_for_any_world_size():
    for n in (0, 1, 7, 53, 100):
        for world in (1, 2, 3, 4, 8):
            shards = [list(ShardSampler(n, num_replicas=world, rank=r)) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
