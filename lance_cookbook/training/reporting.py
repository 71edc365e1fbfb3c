"""Training reports.

The sums behind an epoch's metrics (:class:`EpochTally`), the opening line, each epoch's metrics row (printed,
in the metrics JSON, in TensorBoard) and the digest of the sample order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..recipe.meters import DataWaitMeter
from .checkpoint import write_atomically
from .distributed import all_sum

SUM_KEYS = ("loss_sum", "samples", "data_wait_s", "step_s")


class EpochTally:
    """The sums behind one epoch's training metrics (``SUM_KEYS``).

    ``carried`` holds sums already added up over all ranks. This rank's sums since then are ``loss_sum``
    and ``samples`` (:meth:`add`) and the seconds of :attr:`meter`, the :class:`DataWaitMeter` that
    training wraps its loader with (it owns the data-wait and step sums). :meth:`fold` (every rank at once:
    at a checkpoint and at the epoch's end) moves them into ``carried`` with one ``all_reduce``. A
    checkpoint stores ``carried``, so the epoch's figures survive a restart, also with another number of
    processes; an uninterrupted run folds at the same steps, so both add the same numbers in the same order.

    Parameters
    ----------
    carried : dict of str to float, optional
        Sums restored from a checkpoint (default: zeros).
    """

    def __init__(self, carried: dict[str, float] | None = None):
        self.carried = dict.fromkeys(SUM_KEYS, 0.0) | (carried or {})
        self.loss_sum = self.samples = 0.0
        self.meter = DataWaitMeter()

    def add(self, loss: float, samples: int) -> None:
        """Add one step of this rank: its mean ``loss`` over ``samples`` samples."""
        self.loss_sum += loss * samples
        self.samples += samples

    def fold(self, device: torch.device) -> dict[str, float]:
        """Sum this rank's sums over all ranks into ``carried`` and start them again from zero.

        Every rank must call it at the same point (it runs one ``all_reduce``).

        Returns
        -------
        dict of str to float
            A copy of ``carried``.
        """
        local = [self.loss_sum, self.samples, self.meter.wait_s, self.meter.step_s]
        for key, value in zip(SUM_KEYS, all_sum(local, device), strict=True):
            self.carried[key] += value
        self.loss_sum = self.samples = 0.0
        self.meter.reset()  # a step still running is closed, and counted, after this
        return dict(self.carried)


def write_json(path: str | os.PathLike, data: dict, *, storage_options: dict[str, str] | None = None) -> None:
    """Write ``data`` as strict JSON to ``path`` (a local file or an ``s3://`` URI) atomically.

    A crash leaves the previous file, never half of one
    (:func:`lance_cookbook.training.checkpoint.write_atomically`).

    Raises
    ------
    ValueError
        ``data`` holds NaN or infinity, which is not JSON (RFC 8259; Python would write ``NaN``, which jq,
        JavaScript, Go and Postgres reject: chainerui#16); nothing is written.
    """
    text = json.dumps(data, indent=2, allow_nan=False).encode()
    write_atomically(path, lambda f: f.write(text), storage_options=storage_options)


def quiet(*args, **kwargs) -> None:
    """Print nothing: the log of ranks other than 0."""


def order_digest(indices: list[int]) -> str:
    """A 16-hex-digit digest of a sample order: equal digests, equal orders."""
    return hashlib.sha1(json.dumps(indices).encode()).hexdigest()[:16]


def describe_run(args, world: int, device: torch.device, train_ds, val_ds, log) -> None:
    """Rank 0's opening line: world, device, the rows read, model; a note when ``--amp`` cannot apply."""
    log(
        f"world size {world} on {device}; {describe_rows(train_ds, 'train')} / "
        f"{describe_rows(val_ds, 'val')}, model {args.model}, {args.workers} worker(s) per process",
        flush=True,
    )
    if args.amp and device.type != "cuda":
        log("--amp: no CUDA device, so no autocast and no channels_last: training in float32", flush=True)


def describe_rows(dataset, role: str) -> str:
    """``"101 train rows (version 3, tag 'snap', filter 'label < 5')"``: what a dataset of the run holds."""
    where = [f"version {dataset.version}"]
    if dataset.tag:
        where.append(f"tag {dataset.tag!r}")
    if dataset.filter:
        where.append(f"filter {dataset.filter!r}")
    return f"{len(dataset):,} {role} rows ({', '.join(where)})"


def error_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    An error raised in a DataLoader worker reaches the training process as the same type whose message is
    "Caught X in DataLoader worker process N" and the worker's whole traceback (torch's ``ExceptionWrapper``):
    its last line is the original message, after the qualified class name.
    """
    text = str(error).strip()
    if "\nOriginal Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return re.sub(rf"^[\w.]*\b{type(error).__name__}: ", "", last)


def epoch_metrics(epoch: int, sums: dict[str, float], correct: int, val_seen: int, digest: str) -> dict:
    """One epoch's row of the metrics JSON from the training sums (already summed over ranks)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    seconds = sums["step_s"] / world  # each rank timed the same wall-clock epoch
    return {
        "epoch": epoch,
        "train_loss": sums["loss_sum"] / max(sums["samples"], 1),
        "train_samples_seen": int(sums["samples"]),
        "val_samples_seen": val_seen,
        "val_accuracy": correct / max(val_seen, 1),
        "images_per_s": sums["samples"] / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "data_wait_s": sums["data_wait_s"] / world,  # mean per rank
        "data_wait_fraction": sums["data_wait_s"] / sums["step_s"] if sums["step_s"] > 0 else 0.0,
        "order_digest": digest,
    }


def record_epoch(
    metrics: dict,
    row: dict,
    path: str | Path | None,
    rank: int,
    log: Callable,
    storage_options: dict[str, str] | None = None,
) -> None:
    """Append ``row`` to ``metrics``, print it on rank 0 and rewrite ``path`` there.

    The rewrite is atomic; ``path`` is a local file or an ``s3://`` URI reached with ``storage_options``.
    """
    metrics["epochs"].append(row)
    log(
        f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, val acc {row['val_accuracy']:.2%} "
        f"({row['val_samples_seen']} samples), {row['images_per_s']:,.0f} img/s, "
        f"{row['data_wait_fraction']:.0%} of step time waiting for data",
        flush=True,
    )
    if rank == 0 and path:
        write_json(path, metrics, storage_options=storage_options)


def write_scalars(writer, row: dict, lr: float, epoch: int) -> None:
    """Add an epoch's loss, accuracy, speed, data-wait share and learning rate to TensorBoard.

    ``writer`` is :func:`tensorboard_writer`'s: ``None`` (nothing to do) or a ``SummaryWriter``.
    """
    if writer is None:
        return
    for key in ("train_loss", "val_accuracy", "images_per_s", "data_wait_fraction"):
        writer.add_scalar(key, row[key], epoch)
    writer.add_scalar("learning_rate", lr, epoch)


@contextlib.contextmanager
def tensorboard_writer(log_dir: Path | None, rank: int):
    """A ``torch.utils.tensorboard.SummaryWriter`` on rank 0 with ``--log-dir``; ``None`` otherwise."""
    if log_dir is None or rank != 0:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    writer = SummaryWriter(str(log_dir))
    try:
        yield writer
    finally:
        writer.close()
