"""A DDP training sampler whose batches read runs of consecutive rows: block shuffling.

Lance's ``take`` of a run of consecutive rows costs about 5-7 us per row, a ``take`` of rows scattered over
the dataset about 16 us (``docs/benchmark.md``); on a cold page cache the gap is wider. A full random
permutation (``DistributedSampler``) scatters every batch. :class:`BlockShuffleSampler` shuffles at two
levels instead, in the spirit of FFCV's quasi-random order (shuffle pages, then samples among a few pages
held at once) and MosaicML Streaming's block shuffles (shuffle shards, then samples inside fixed-size
blocks of the shard order):

1. the dataset's rows are cut into blocks of ``block_size`` consecutive rows and the blocks are permuted;
2. the rows of that block order are padded (or cut) as ``DistributedSampler`` does and split into one
   contiguous chunk per rank, so a rank owns whole blocks (at most two partial ones at its chunk's ends);
3. inside each rank's chunk, rows are shuffled within windows of ``window`` blocks, so a batch mixes rows
   of a few blocks while a worker's ``take`` still lands on a few short ranges of rows.

The shuffle is only as good as the row order on disk: blocks of an ImageFolder-ordered dataset hold one
class each. Write the rows in a random order once (conversion) and block shuffling then gives batches whose
label mix matches a full shuffle; see ``docs/benchmark.md`` for the measured trade-off.
"""

from __future__ import annotations

from collections.abc import Sized

import torch

from .sampler import ResumableSampler, pad_order

__all__ = ["BlockShuffleSampler"]


class BlockShuffleSampler(ResumableSampler):
    """Shuffle blocks of consecutive rows, then rows within windows of blocks; one chunk per DDP rank.

    The constructor is ``DistributedSampler``'s plus ``block_size`` and ``window``, and so are the
    guarantees: every rank gets ``len(self)`` indices, the ranks together cover every row exactly once per
    epoch (plus padding, or minus the dropped tail with ``drop_last``), :meth:`set_epoch` changes the order,
    and the order depends only on ``(seed, epoch)``, the dataset size and the world size, so every rank
    computes the same :meth:`block_order` and takes its own contiguous chunk of it.

    It resumes mid-epoch as :class:`ResumableDistributedSampler` does, with the same code
    (:class:`ResumableSampler`): its :meth:`global_order` lists the chunks interleaved (position
    ``j * w + r`` holds the ``j``-th index of rank ``r``'s chunk), so a step of ``b`` samples per rank
    consumes ``w * b`` consecutive positions and the state is ``(epoch, samples consumed)``. After an
    elastic restart the rest of the interrupted epoch is split among the new ranks position by position:
    nothing is repeated or skipped, but each new rank's batches then draw from several old chunks, so
    reads are less contiguous until the next epoch, which is laid out for the new world size.

    Parameters
    ----------
    dataset : Sized
        Anything with ``len()`` (a ``SafeLanceDataset``); its indices are row positions ``0 .. n-1``.
    num_replicas : int, optional
        World size; default ``torch.distributed``'s if initialised, else 1.
    rank : int, optional
        This process's rank; default ``torch.distributed``'s if initialised, else 0.
    shuffle : bool, default True
        ``False``: no shuffling at all; rank ``r`` reads the ``r``-th contiguous chunk of rows in order
        (unlike ``DistributedSampler``, which interleaves ranks row by row).
    seed : int, default 0
        Base seed; epoch ``e`` uses ``seed + e`` (as ``DistributedSampler``). Must agree across ranks.
    drop_last : bool, default False
        ``False``: pad the global order with its own first rows up to a multiple of ``num_replicas`` (some
        rows are then seen twice in an epoch). ``True``: cut its tail to a multiple of ``num_replicas``
        (those rows are skipped this epoch; a different set every epoch when shuffling).
    block_size : int, default 64
        Rows per block: the unit that is read contiguously. Choose about the per-rank batch size.
    window : int, default 2
        Blocks per shuffle window inside a rank's chunk. 1: a batch of ``block_size`` rows is one block in
        a random inner order (best locality, least mixing); larger windows mix more blocks per batch and
        scatter each ``take`` over more ranges. Measured (``docs/benchmark.md``, 10,000 32x32 JPEGs,
        batches of 64): a ``take`` costs 6.1 us/row with window 1, 6-7.7 with 2, 10 with 4 and 12-14 with 8,
        against 14-17 for a random permutation. The default, 2, keeps reads 2.2x cheaper than random and
        still changes which rows share a batch every epoch (window 1 with ``block_size`` equal to the
        batch size would repeat the same batches, reordered).

    Raises
    ------
    ValueError
        If ``rank`` is not in ``[0, num_replicas)``, ``num_replicas < 1``, ``block_size < 1`` or
        ``window < 1``.

    Notes
    -----
    ``__iter__`` yields Python ints; ``len(self) == ceil(n / num_replicas)`` (``floor`` with
    ``drop_last``), exactly as ``DistributedSampler``. Building one epoch's order costs O(n) time and
    ``8 n`` bytes (int64) on every rank, as ``DistributedSampler``'s ``randperm`` does.
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
        """The epoch's indices as the blocks lay them out: rank ``r`` of the world size the epoch began
        with (``order_replicas``) reads the ``r``-th of that many equal contiguous slices.

        Returns
        -------
        torch.Tensor
            int64, shape ``[total_size]``: row positions, padding included.
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
        # rows in block order: block k's rows are k*b .. min(n, (k+1)*b) - 1; the short last block (if any)
        # lands wherever its block does
        blocks = torch.randperm(num_blocks, generator=g)
        rows = (blocks[:, None] * b + torch.arange(b)[None, :]).reshape(-1)
        rows = rows[rows < n]
        rows = pad_order(rows, self.total_size)
        # windows are counted from the start of each rank's chunk, so every rank's first batch already
        # mixes `window` blocks and no window straddles two ranks
        chunk = self.total_size // self.order_replicas
        pos = torch.arange(self.total_size)
        span = self.window * b
        windows_per_rank = -(-chunk // span)
        window_id = (pos // chunk) * windows_per_rank + (pos % chunk) // span
        # one argsort shuffles every window at once: the integer part keeps windows in place, the random
        # fraction orders rows inside each (float64 holds both exactly enough for any realistic size)
        keys = window_id.to(torch.float64) + torch.rand(self.total_size, generator=g, dtype=torch.float64)
        return rows[torch.argsort(keys, stable=True)]

    def _order(self) -> torch.Tensor:
        # the chunks interleaved, rank r's j-th index at position j * w + r: one training step then
        # consumes a prefix of what remains, which is all ResumableSampler needs
        return self.block_order().reshape(self.order_replicas, -1).T.reshape(-1)

    def indices(self) -> torch.Tensor:
        """This rank's indices for the rest of the current epoch: int64, shape ``[len(self)]``."""
        p = self.positions()
        return self._order()[p.start : p.stop : p.step]
