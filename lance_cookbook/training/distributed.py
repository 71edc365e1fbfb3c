"""Process-group plumbing for training.

Join torchrun's group, sum numbers over ranks, and let rank 0 decide what every rank reads (dataset versions)
before any rank opens it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..recipe.dataset import DatasetNotFound, resolve_version

T = TypeVar("T")


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone.

    Returns
    -------
    tuple of (int, int, torch.device)
        ``(rank, world_size, device)``; ``(0, 1, ...)`` without torchrun's ``RANK`` variable.
    """
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    store, rank, world = next(dist.rendezvous("env://"))
    # After a torchrun restart, the restarted ranks met gloo addresses left in the store by the killed
    # attempt ("connectFullMesh failed ... Connection refused"): keep each attempt's keys apart.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"lance_cookbook/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size(), device


class StopRequest:
    """Remembers a SIGTERM instead of dying of it, so training can stop at a step boundary and checkpoint.

    Spot instances and SLURM send SIGTERM, then SIGKILL about 30 s later; ``torch.distributed.run`` passes a
    SIGTERM it gets to every rank's process group. :func:`lance_cookbook.train.main` installs one for the
    run, and :func:`lance_cookbook.train.train_one_epoch` reads :attr:`requested` after each step; its
    per-step ``all_reduce`` makes every rank stop after the same step.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """True once a signal arrived."""
        return self.signum is not None

    def __call__(self) -> bool:
        """Whether a stop was requested (:attr:`requested`), so the object works as a callable."""
        return self.requested

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[StopRequest]:
        """Handle ``signals`` inside the block and restore the previous handlers after it.

        Outside the main thread (where Python cannot set handlers) nothing is installed and the signals keep
        their effect.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def ignore_sigterm(worker_id: int) -> None:
    """``worker_init_fn`` for training's DataLoader workers: ignore SIGTERM.

    ``torch.distributed.run`` (``os.killpg``), SLURM and a shutting-down node send it to the workers as well;
    a worker dying of it makes the rank's next batch (or PyTorch's SIGCHLD handler, at any moment) raise
    "DataLoader worker ... is killed by signal", so the rank could not finish its step and checkpoint.
    The workers still end with the rank (:class:`lance_cookbook.recipe.loader.WorkerInit`) or by SIGKILL.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def distribute(model: nn.Module, device: torch.device, *, channels_last: bool = False) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in ``DistributedDataParallel`` when several processes train.

    ``channels_last`` stores the weights in NHWC, where convolutions run faster on GPUs (``--amp``).
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all ranks in float64 (identity when running alone)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agreed_versions(
    uris: dict[str, str], requested: dict[str, int | str | None], storage_options: dict | None, rank: int
) -> dict[str, int]:
    """The dataset version each rank reads, decided once by rank 0.

    Rank 0's decision is broadcast before any rank opens the data.

    Each rank resolving "latest" itself can see a different version when a writer commits while the job
    starts; ranks then disagree on the dataset length, run different numbers of steps and hang in a
    gradient ``all_reduce``.

    Parameters
    ----------
    uris : dict of str to str
        A name (``"train"``) to its URI.
    requested : dict of str to int, str or None
        The same names to a version number, a tag (resolved to its number here: moving the tag later changes
        nothing), or ``None`` for the latest.
    storage_options : dict, optional
        Object-store options for every URI.
    rank : int
        This process's rank; rank 0 decides.

    Returns
    -------
    dict of str to int
        The same names to the version every rank reads.

    Raises
    ------
    DatasetNotFound
        On every rank, when rank 0 cannot open a URI or finds no such version or tag (the message lists
        those there are).
    """
    return rank0_decides(
        rank,
        lambda: {
            name: resolve_version(uri, requested[name], storage_options=storage_options)
            for name, uri in uris.items()
        },
        DatasetNotFound,
    )


def rank0_decides(rank: int, decide: Callable[[], T], errors: type[Exception] | tuple) -> T:
    """Return what ``decide()`` returns on rank 0, on every rank (one ``broadcast_object_list``).

    Raises
    ------
    Exception
        On every rank, the exception of a type in ``errors`` that ``decide`` raised on rank 0; others
        propagate on rank 0 alone (the launcher then ends the job).
    """
    decided: list = [None]
    if rank == 0:
        try:
            decided[0] = decide()
        except errors as e:
            decided[0] = e
    if dist.is_initialized():
        dist.broadcast_object_list(decided, src=0)
    if isinstance(decided[0], Exception):
        raise decided[0]
    return decided[0]
