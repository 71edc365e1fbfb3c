"""Samplers for DDP: the exactly-once shard that evaluation needs."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ShardSampler"]


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets the contiguous rows ``[n*r//w, n*(r+1)//w)``: no padding, no shuffling.

    ``DistributedSampler`` pads the index list so every rank gets the same count, which makes an evaluation
    count some samples twice. With this sampler the shards partition the dataset, so summing correct
    predictions and sample counts over ranks (``all_reduce``) gives exact figures. Shards may differ in
    length by one, so evaluate on the unwrapped module (``ddp.module``): a DDP forward may run collectives.
    Contiguous shards keep each worker's ``take`` reads local.
    """

    def __init__(self, data_source: Sized | int, num_replicas: int | None = None, rank: int | None = None):
        n = data_source if isinstance(data_source, int) else len(data_source)
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples_total = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.start = n * rank // num_replicas
        self.stop = n * (rank + 1) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
