"""Samplers for DDP: an exactly-once shard for evaluation, a training sampler that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ShardSampler", "ResumableSampler", "ResumableDistributedSampler", "pad_order"]


def replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Return ``(num_replicas, rank)``, from the process group (else 1, 0) when None; raise ``ValueError``."""
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

    Exact evaluation counts, unlike ``DistributedSampler`` (pytorch#25162). Shards may differ by one row:
    evaluate on ``ddp.module``, whose forward runs no collectives (docs/training.md).
    """

    def __init__(self, data_source: Sized | int, num_replicas: int | None = None, rank: int | None = None):
        n = data_source if isinstance(data_source, int) else len(data_source)
        num_replicas, rank = replicas_and_rank(num_replicas, rank)
        self.num_samples_total, self.num_replicas, self.rank = n, num_replicas, rank
        self.start = n * rank // num_replicas
        self.stop = n * (rank + 1) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class ResumableSampler(Sampler[int]):
    """A DDP training sampler whose place in an epoch is ``(epoch, samples consumed)``, on any world size.

    A subclass defines the epoch's global order (:meth:`_order`); rank ``r`` of ``w`` takes positions
    ``r, r + w, ...``. Resumed on another world size, the rest is split among the new ranks.

    Parameters
    ----------
    dataset, num_replicas, rank, shuffle, seed, drop_last
        As ``DistributedSampler``'s: ``len(dataset)`` rows; world size and rank from ``torch.distributed``
        (else 1 and 0); shuffle with ``seed + epoch``; pad to a multiple of the world size, or cut.

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
        self.dataset_size = len(dataset)
        self.num_replicas, self.rank = replicas_and_rank(num_replicas, rank)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start = 0  # positions of this epoch's global order consumed before this pass
        self.total_size = self._padded_size()
        self.order_replicas = self.num_replicas  # the world size this epoch's order was laid out for
        self._resume_epoch: int | None = None

    def _padded_size(self) -> int:
        n, w = self.dataset_size, self.num_replicas
        return n - n % w if self.drop_last else -(-n // w) * w

    def _order(self) -> torch.Tensor:
        """Return the epoch's global order, int64 ``[total_size]``, the same on every rank."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample, unless a loaded state resumes that very epoch."""
        resuming = epoch == self._resume_epoch
        self._resume_epoch = None
        if resuming:
            return
        self.epoch = epoch
        self.start = 0
        self.total_size = self._padded_size()
        self.order_replicas = self.num_replicas

    def global_order(self) -> list[int]:
        """Return the epoch's indices for all ranks, ``total_size`` of them, padding included."""
        return self._order().tolist()

    def positions(self) -> range:
        """Return this rank's positions in :meth:`global_order` for the rest of the epoch."""
        return range(self.start + self.rank, self.total_size, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        p = self.positions()
        return iter(self._order()[p.start : p.stop : p.step].tolist())

    def __len__(self) -> int:
        return len(self.positions())

    def batches_per_rank(self, batch_size: int) -> list[int]:
        """Return each rank's batches left; unequal after an elastic restart (see ``DDP.join``)."""
        remaining = self.total_size - self.start
        sizes = [len(range(r, remaining, self.num_replicas)) for r in range(self.num_replicas)]
        return [-(-s // batch_size) for s in sizes]

    def consumed(self, steps: int, batch_size: int) -> int:
        """Return samples consumed after ``steps`` full steps of this pass, at most the total."""
        return min(self.total_size, self.start + steps * self.num_replicas * batch_size)

    def state_dict(self, consumed: int) -> dict[str, int | bool]:
        """Return the state to checkpoint after ``consumed`` samples (at the end: the next epoch's start)."""
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
            Another kind of sampler saved ``state``, or a parameter of the order (``_order_keys``) differs.
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
    """Cut ``rows`` to ``total``, or pad it with its first rows repeated, as ``DistributedSampler`` does."""
    if total <= len(rows):
        return rows[:total]
    reps = -(-(total - len(rows)) // len(rows))
    return torch.cat([rows, rows.repeat(reps)[: total - len(rows)]])


class ResumableDistributedSampler(ResumableSampler):
    """``DistributedSampler`` (same constructor, same order) that resumes mid-epoch (``ResumableSampler``)."""

    def _order(self) -> torch.Tensor:
        n = self.dataset_size
        if self.shuffle:
            indices = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            indices = torch.arange(n, dtype=torch.int64)
        return pad_order(indices, self.total_size)  # total_size is 0 when n is
