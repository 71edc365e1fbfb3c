"""A DDP training sampler whose batches read runs of consecutive rows: block shuffling.

A ``take`` of consecutive rows costs about a third of one of scattered rows (docs/benchmark.md); why and
what it needs of the data: docs/training.md, "Block-shuffled reads".
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import torch

from .sampler import ResumableSampler, pad_order

__all__ = ["BlockShuffleSampler"]


class BlockShuffleSampler(ResumableSampler):
    """Shuffle blocks of consecutive rows, then rows within windows of blocks; one chunk per DDP rank.

    ``DistributedSampler``'s constructor and guarantees (every row once per epoch plus padding), and
    :class:`.sampler.ResumableSampler`'s resumption: :meth:`global_order` interleaves the ranks' chunks.

    Parameters
    ----------
    dataset, num_replicas, rank, shuffle, seed, drop_last
        As ``DistributedSampler``'s; ``shuffle=False`` gives rank ``r`` the ``r``-th chunk of rows in order.
    block_size : int, default 64
        Rows read contiguously; about the per-rank batch size.
    window : int, default 2
        Blocks shuffled together in a rank's chunk: 1 reads best but repeats batches when ``block_size`` is
        the batch size; more mix more and read worse (``docs/benchmark.md``).

    Raises
    ------
    ValueError
        ``rank`` not in ``[0, num_replicas)``, ``num_replicas < 1``, ``block_size < 1`` or ``window < 1``.
    """

    _order_keys = (*ResumableSampler._order_keys, "block_size", "window")

    def __init__(self, dataset: Sized, *args: Any, block_size: int = 64, window: int = 2, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)  # DistributedSampler's arguments, in its order
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.block_size, self.window = block_size, window

    def block_order(self) -> torch.Tensor:
        """Return the epoch's rows in block order, int64 ``[total_size]``; rank ``r`` reads slice ``r``."""
        n, b = self.dataset_size, self.block_size
        if n == 0 or self.total_size == 0:
            return torch.empty(0, dtype=torch.int64)
        if not self.shuffle:
            return pad_order(torch.arange(n, dtype=torch.int64), self.total_size)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        # block k holds rows k*b .. min(n, (k+1)*b) - 1; a short last block lands wherever its block does
        blocks = torch.randperm(-(-n // b), generator=g)
        rows = (blocks[:, None] * b + torch.arange(b)[None, :]).reshape(-1)
        rows = pad_order(rows[rows < n], self.total_size)
        # windows counted from each rank's chunk start: no window straddles two ranks
        chunk = self.total_size // self.order_replicas
        pos = torch.arange(self.total_size)
        span = self.window * b
        windows_per_rank = -(-chunk // span)
        window_id = (pos // chunk) * windows_per_rank + (pos % chunk) // span
        # one argsort shuffles every window: the integer part keeps windows in place, the fraction shuffles
        keys = window_id.to(torch.float64) + torch.rand(self.total_size, generator=g, dtype=torch.float64)
        return rows[torch.argsort(keys, stable=True)]

    def _order(self) -> torch.Tensor:
        # chunks interleaved (rank r's j-th index at j * w + r): a step consumes a prefix, as resuming needs
        return self.block_order().reshape(self.order_replicas, -1).T.reshape(-1)

    def indices(self) -> torch.Tensor:
        """Return this rank's indices for the rest of the current epoch: int64, shape ``[len(self)]``."""
        p = self.positions()
        return self._order()[p.start : p.stop : p.step]
