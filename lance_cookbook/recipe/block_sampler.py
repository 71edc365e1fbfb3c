"""A DDP training sampler whose batches read runs of consecutive rows: block shuffling.

A ``take`` of consecutive rows costs about a third of one of scattered rows (``docs/benchmark.md``). As in
FFCV's quasi-random order and MosaicML Streaming's block shuffles, blocks are permuted, then rows shuffled
within a few blocks. Blocks of an ImageFolder-ordered dataset hold one class: shuffle rows at conversion.
"""

from __future__ import annotations

from collections.abc import Sized

import torch

from .sampler import ResumableSampler, pad_order

__all__ = ["BlockShuffleSampler"]


class BlockShuffleSampler(ResumableSampler):
    """Shuffle blocks of consecutive rows, then rows within windows of blocks; one chunk per DDP rank.

    ``DistributedSampler``'s constructor and guarantees (``len(self)`` indices per rank, every row once per
    epoch plus padding, an order that depends on ``(seed, epoch)``, dataset size and world size), and
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

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        block_size: int = 64,
        window: int = 2,
    ):
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.block_size = block_size
        self.window = window

    def block_order(self) -> torch.Tensor:
        """Return the epoch's row positions in block order, int64 ``[total_size]``, padding included.

        Rank ``r`` of the world size the epoch began with (``order_replicas``) reads the ``r``-th of that
        many equal contiguous slices.
        """
        n, b = self.dataset_size, self.block_size
        if n == 0 or self.total_size == 0:
            return torch.empty(0, dtype=torch.int64)
        if not self.shuffle:
            rows = torch.arange(n, dtype=torch.int64)
            return pad_order(rows, self.total_size)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        num_blocks = -(-n // b)
        # block k holds rows k*b .. min(n, (k+1)*b) - 1; a short last block lands wherever its block does
        blocks = torch.randperm(num_blocks, generator=g)
        rows = (blocks[:, None] * b + torch.arange(b)[None, :]).reshape(-1)
        rows = rows[rows < n]
        rows = pad_order(rows, self.total_size)
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
