"""A DDP training sampler whose batches read runs of consecutive rows: block shuffling.

Lance's ``take`` of a run of consecutive rows costs about 5-7 us per row, a ``take`` of rows scattered over
the dataset about 16 us (``../shared/GUIDE.md``); on a cold page cache the gap is wider. A full random
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

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["BlockShuffleSampler", "mean_batch_entropy"]


class BlockShuffleSampler(Sampler[int]):
    """Shuffle blocks of consecutive rows, then rows within windows of blocks; one chunk per DDP rank.

    The constructor is ``DistributedSampler``'s plus ``block_size`` and ``window``, and so are the
    guarantees: every rank gets ``len(self)`` indices, the ranks together cover every row exactly once per
    epoch (plus padding, or minus the dropped tail with ``drop_last``), :meth:`set_epoch` changes the order,
    and the order depends only on ``(seed, epoch)`` and the dataset size, so every rank computes the same
    :meth:`global_order` and takes its own slice of it.

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
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.dataset_size = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.block_size = block_size
        self.window = window
        self.epoch = 0
        n, w = self.dataset_size, num_replicas
        self.num_samples = n // w if drop_last else -(-n // w)
        self.total_size = self.num_samples * w

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (``seed + epoch``) from the next ``iter()`` on. Call it every epoch."""
        self.epoch = epoch

    def global_order(self) -> torch.Tensor:
        """The epoch's indices for all ranks together: rank ``r`` reads the ``r``-th of ``num_replicas``
        equal contiguous slices.

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
            return _pad(rows, self.total_size)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        num_blocks = -(-n // b)
        # rows in block order: block k's rows are k*b .. min(n, (k+1)*b) - 1; the short last block (if any)
        # lands wherever its block does
        blocks = torch.randperm(num_blocks, generator=g)
        rows = (blocks[:, None] * b + torch.arange(b)[None, :]).reshape(-1)
        rows = rows[rows < n]
        rows = _pad(rows, self.total_size)
        # windows are counted from the start of each rank's chunk, so every rank's first batch already
        # mixes `window` blocks and no window straddles two ranks
        pos = torch.arange(self.total_size)
        span = self.window * b
        windows_per_rank = -(-self.num_samples // span)
        window_id = (pos // self.num_samples) * windows_per_rank + (pos % self.num_samples) // span
        # one argsort shuffles every window at once: the integer part keeps windows in place, the random
        # fraction orders rows inside each (float64 holds both exactly enough for any realistic size)
        keys = window_id.to(torch.float64) + torch.rand(self.total_size, generator=g, dtype=torch.float64)
        return rows[torch.argsort(keys, stable=True)]

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch: int64, shape ``[num_samples]``."""
        start = self.rank * self.num_samples
        return self.global_order()[start : start + self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


def _pad(rows: torch.Tensor, total: int) -> torch.Tensor:
    """``rows`` cut to ``total``, or padded with its own first rows, repeated as often as needed (as
    ``DistributedSampler`` pads when the dataset is smaller than the world size)."""
    if total <= len(rows):
        return rows[:total]
    reps = -(-(total - len(rows)) // len(rows))
    return torch.cat([rows, rows.repeat(reps)[: total - len(rows)]])


def mean_batch_entropy(labels: Sequence[int], order: Iterable[int], batch_size: int) -> float:
    """Shuffle quality: the mean Shannon entropy (bits) of the label mix of each full batch of ``order``.

    Compare it with the same figure for a uniformly random permutation: a sampler whose batches mix classes
    as well as a full shuffle scores the same; batches of one class score 0.

    Parameters
    ----------
    labels : Sequence[int]
        Label of each row, length ``n``.
    order : Iterable[int]
        Row positions in the order a sampler yields them (one rank's, or all ranks' concatenated).
    batch_size : int
        Rows per batch; a last, partial batch is left out.

    Returns
    -------
    float
        Mean entropy in bits (0.0 if there is no full batch); at most ``log2(min(batch_size, classes))``.

    Raises
    ------
    ValueError
        If ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(order)
    entropies = []
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        counts = Counter(labels[r] for r in rows[start : start + batch_size]).values()
        entropies.append(-sum(c / batch_size * math.log2(c / batch_size) for c in counts))
    return sum(entropies) / len(entropies) if entropies else 0.0
