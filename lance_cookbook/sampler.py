"""Samplers for DDP: an exactly-once shard for evaluation, a training sampler that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ShardSampler", "ResumableDistributedSampler"]


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


class ResumableDistributedSampler(Sampler[int]):
    """``DistributedSampler`` whose place inside an epoch can be saved and restored, under the same or
    another number of processes.

    The constructor is ``DistributedSampler``'s, and so is the order: each epoch's **global order** is the
    permutation seeded by ``seed + epoch`` (``torch.randperm``), padded at the end with the epoch's first
    samples up to a multiple of the world size (or cut to one with ``drop_last``), and rank ``r`` takes
    positions ``r, r + w, r + 2w, ...``. A training step of ``b`` samples per rank therefore consumes the
    ``w * b`` consecutive positions of the global order, and the sampler's state is just
    ``(epoch, samples consumed)``.

    After :meth:`load_state_dict`, rank ``r`` of ``w`` takes positions ``consumed + r, consumed + r + w,
    ...`` of the same global order. With the world size unchanged, ``consumed`` is a multiple of ``w * b``
    and every rank continues with exactly the batches an uninterrupted run would have given it. With
    another world size (an elastic restart), the remaining positions are split among the new ranks: no
    sample of the epoch is repeated or skipped; the shards may then differ in length by one (see
    :meth:`batches_per_rank`). The epoch's padded length stays what it was when the epoch began; later
    epochs are padded for the new world size.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset_size = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # positions of this epoch's global order consumed before this pass
        self.total_size = self._padded_size()
        self._resume_epoch: int | None = None

    def _padded_size(self) -> int:
        n, w = self.dataset_size, self.num_replicas
        return n - n % w if self.drop_last else -(-n // w) * w

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample, unless a loaded state resumes that very epoch."""
        if epoch == self._resume_epoch:
            self._resume_epoch = None
            return
        self._resume_epoch = None
        self.epoch = epoch
        self.start = 0
        self.total_size = self._padded_size()

    def global_order(self) -> list[int]:
        """The epoch's dataset indices for all ranks together, ``total_size`` of them (padding included)."""
        n = self.dataset_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.total_size <= n:
            return indices[: self.total_size]
        padding = self.total_size - n
        return indices + (indices * -(-padding // n))[:padding]

    def positions(self) -> range:
        """This rank's positions in :meth:`global_order` for the rest of the epoch, in order."""
        return range(self.start + self.rank, self.total_size, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        return iter([order[p] for p in self.positions()])

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
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the epoch of ``state`` at its next sample; the next ``set_epoch`` of that epoch keeps it.

        Raises
        ------
        ValueError
            The dataset's length, the seed or the shuffling differ from the checkpoint's: the epoch's
            order would not be the one that was interrupted.
        """
        for key, mine in (
            ("dataset_size", self.dataset_size),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"the checkpoint's sampler has {key}={state[key]!r} but this one has {mine!r}; resume "
                    "with the dataset version, --seed and shuffling the interrupted run used"
                )
        if state["consumed"] == 0:  # an epoch's start: padded for the world size of this run
            self.set_epoch(state["epoch"])
            return
        self.epoch = state["epoch"]
        self.start = state["consumed"]
        self.total_size = state["total_size"]
        self._resume_epoch = self.epoch
