"""Samplers for DDP: an exactly-once shard for evaluation, a training sampler that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ShardSampler", "ResumableSampler", "ResumableDistributedSampler", "pad_order"]


def replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``, each taken from the process group when ``None`` (1 and 0 without one),
    as ``DistributedSampler`` does. Raises ``ValueError`` for a world size below 1 or a rank outside it."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    return num_replicas, rank


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
        num_replicas, rank = replicas_and_rank(num_replicas, rank)
        self.num_samples_total = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.start = n * rank // num_replicas
        self.stop = n * (rank + 1) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class ResumableSampler(Sampler[int]):
    """The resumable part of a DDP training sampler: a place inside the epoch that can be saved as
    ``(epoch, samples consumed)`` and restored under the same or another number of processes.

    A subclass defines the epoch's **global order** (:meth:`_order`): ``total_size`` dataset indices for
    all ranks together, laid out so that rank ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...``.
    A training step of ``b`` samples per rank then consumes the ``w * b`` next positions of that order,
    and the place inside an epoch is one number: the samples consumed, the same on every rank.

    After :meth:`load_state_dict`, rank ``r`` of ``w`` takes positions ``consumed + r, consumed + r + w,
    ...`` of the same global order. With the world size unchanged, ``consumed`` is a multiple of ``w * b``
    and every rank continues with exactly the batches an uninterrupted run would have given it. With
    another world size (an elastic restart), the remaining positions are split among the new ranks: no
    sample of the epoch is repeated or skipped; the shards may then differ in length by one (see
    :meth:`batches_per_rank`). The epoch keeps the padded length and the layout (``order_replicas``, the
    world size its order was built for) it began with; later epochs are built for the new world size.

    Parameters
    ----------
    dataset : Sized
        Anything with ``len()``; its indices are ``0 .. n-1``.
    num_replicas, rank : int, optional
        World size and this process's rank; default ``torch.distributed``'s if initialised, else 1 and 0.
    shuffle : bool
        Shuffle every epoch (``seed + epoch``), or keep an order that only the layout decides.
    seed : int
        Base seed; must agree across ranks.
    drop_last : bool
        ``False``: pad the global order with its own first indices up to a multiple of the world size;
        ``True``: cut its tail to one.

    Raises
    ------
    ValueError
        If ``num_replicas < 1`` or ``rank`` is not in ``[0, num_replicas)``.
    """

    # constructor arguments the global order depends on: a checkpoint must agree with them to resume
    _order_keys: tuple[str, ...] = ("dataset_size", "seed", "shuffle")

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        num_replicas, rank = replicas_and_rank(num_replicas, rank)
        self.dataset_size = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # positions of this epoch's global order consumed before this pass
        self.total_size = self._padded_size()
        self.order_replicas = num_replicas  # the world size this epoch's order was laid out for
        self._resume_epoch: int | None = None

    def _padded_size(self) -> int:
        n, w = self.dataset_size, self.num_replicas
        return n - n % w if self.drop_last else -(-n // w) * w

    def _order(self) -> torch.Tensor:
        """The epoch's global order: int64, shape ``[total_size]``. Subclasses define it from ``seed``,
        ``epoch``, ``dataset_size``, ``total_size`` and ``order_replicas`` only, so every rank (and a
        resumed run) computes the same one."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample, unless a loaded state resumes that very epoch."""
        if epoch == self._resume_epoch:
            self._resume_epoch = None
            return
        self._resume_epoch = None
        self.epoch = epoch
        self.start = 0
        self.total_size = self._padded_size()
        self.order_replicas = self.num_replicas

    def global_order(self) -> list[int]:
        """The epoch's dataset indices for all ranks together, ``total_size`` of them (padding included);
        rank ``r`` of ``w`` takes positions ``r, r + w, ...`` (from ``consumed + r`` when resuming)."""
        return self._order().tolist()

    def positions(self) -> range:
        """This rank's positions in :meth:`global_order` for the rest of the epoch, in order."""
        return range(self.start + self.rank, self.total_size, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        p = self.positions()
        return iter(self._order()[p.start : p.stop : p.step].tolist())

    def __len__(self) -> int:
        return len(self.positions())

    def batches_per_rank(self, batch_size: int) -> list[int]:
        """How many batches of ``batch_size`` every rank gets for the rest of the epoch.

        Equal unless an elastic restart left a remainder that the new world size does not divide; then
        the ranks with one batch fewer must join the others' collectives (``DistributedDataParallel.join``).
        """
        remaining = self.total_size - self.start
        sizes = [len(range(r, remaining, self.num_replicas)) for r in range(self.num_replicas)]
        return [-(-s // batch_size) for s in sizes]

    def consumed(self, steps: int, batch_size: int) -> int:
        """Global samples consumed in this epoch after ``steps`` steps of this pass in which every rank
        had a full batch (and at the epoch's end, the padded total)."""
        return min(self.total_size, self.start + steps * self.num_replicas * batch_size)

    def state_dict(self, consumed: int) -> dict[str, int | bool]:
        """The state to checkpoint once ``consumed`` samples of the epoch have been trained on; at the
        epoch's end (``consumed == total_size``) that is the start of the next epoch."""
        done = consumed >= self.total_size
        return {
            "epoch": self.epoch + 1 if done else self.epoch,
            "consumed": 0 if done else consumed,
            "total_size": self.total_size,
            "order_replicas": self.order_replicas,
            "sampler": type(self).__name__,
            **{key: getattr(self, key) for key in self._order_keys},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the epoch of ``state`` at its next sample; the next ``set_epoch`` of that epoch keeps it.

        Raises
        ------
        ValueError
            Another kind of sampler saved ``state``, or the dataset's length, the seed, the shuffling (or
            a subclass's order parameters) differ from the checkpoint's: the epoch's order would not be
            the one that was interrupted.
        """
        saved_by = state.get("sampler", "ResumableDistributedSampler")  # older checkpoints name none
        if saved_by != type(self).__name__:
            raise ValueError(
                f"the checkpoint's sampler is a {saved_by} but this one is a {type(self).__name__}; resume "
                "with the --sampler the interrupted run used"
            )
        for key in self._order_keys:
            mine = getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"the checkpoint's sampler has {key}={state[key]!r} but this one has {mine!r}; resume "
                    "with the dataset version, --seed and sampler options the interrupted run used"
                )
        if state["consumed"] == 0:  # an epoch's start: laid out for the world size of this run
            self.set_epoch(state["epoch"])
            return
        self.epoch = state["epoch"]
        self.start = state["consumed"]
        self.total_size = state["total_size"]
        self.order_replicas = state.get("order_replicas", self.num_replicas)
        self._resume_epoch = self.epoch


def pad_order(rows: torch.Tensor, total: int) -> torch.Tensor:
    """``rows`` cut to ``total``, or padded with its own first rows, repeated as often as needed: how
    ``DistributedSampler`` pads (also when the dataset is smaller than the world size)."""
    if total <= len(rows):
        return rows[:total]
    reps = -(-(total - len(rows)) // len(rows))
    return torch.cat([rows, rows.repeat(reps)[: total - len(rows)]])


class ResumableDistributedSampler(ResumableSampler):
    """``DistributedSampler`` whose place inside an epoch can be saved and restored, under the same or
    another number of processes (:class:`ResumableSampler`).

    The constructor is ``DistributedSampler``'s, and so is the order: each epoch's **global order** is the
    permutation seeded by ``seed + epoch`` (``torch.randperm``), padded at the end with the epoch's first
    samples up to a multiple of the world size (or cut to one with ``drop_last``), and rank ``r`` takes
    positions ``r, r + w, r + 2w, ...``. A training step of ``b`` samples per rank therefore consumes the
    ``w * b`` consecutive positions of the global order, and the sampler's state is just
    ``(epoch, samples consumed)``.
    """

    def _order(self) -> torch.Tensor:
        n = self.dataset_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g)
        else:
            indices = torch.arange(n, dtype=torch.int64)
        if n == 0:
            return indices
        return pad_order(indices, self.total_size)
