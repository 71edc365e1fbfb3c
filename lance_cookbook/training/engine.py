"""The training and evaluation loops: one epoch of forward/backward/step, an exactly-once evaluation, and
the per-epoch sums (:class:`EpochTally`) they add to."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..recipe.device import IMAGENET_MEAN, IMAGENET_STD, to_device
from ..recipe.meters import DataWaitMeter
from .distributed import all_sum

SUM_KEYS = ("loss_sum", "samples", "data_wait_s", "step_s")


class TrainingDiverged(FloatingPointError):
    """A non-finite (NaN or infinite) training loss or weight; the message names the epoch and step.

    Raised on every rank at the same step, before the optimizer applies that step's update, so no weight
    and no checkpoint takes the non-finite values (t3-train-nan-loss-unnoticed; chainerui#16).
    """


class Stopped(Exception):
    """Raised by :func:`train_one_epoch` once the step at which the ranks agreed to stop is done (its
    update applied, its ``after_step`` run). ``steps``: the steps of this pass done."""

    def __init__(self, steps: int):
        super().__init__(f"stopped after step {steps} of this pass")
        self.steps = steps


class EpochTally:
    """The sums behind one epoch's training metrics (``SUM_KEYS``: loss x samples, samples, seconds
    waiting for data, seconds of whole steps).

    ``carried`` holds sums already added up over all ranks; ``local`` this rank's sums since. :meth:`fold`
    (every rank at once: at a checkpoint and at the epoch's end) moves ``local`` into ``carried`` with one
    ``all_reduce``. A checkpoint stores ``carried``, so the epoch's figures survive a restart, also with
    another number of processes; an uninterrupted run folds at the same steps, so both add the same
    numbers in the same order.
    """

    def __init__(self, carried: dict[str, float] | None = None):
        self.carried = dict.fromkeys(SUM_KEYS, 0.0) | (carried or {})
        self.local = dict.fromkeys(SUM_KEYS, 0.0)

    def add(self, **values: float) -> None:
        """Add this rank's ``values`` (keys from ``SUM_KEYS``)."""
        for key, value in values.items():
            self.local[key] += value

    def fold(self, device: torch.device) -> dict[str, float]:
        """All ranks: sum ``local`` over ranks into ``carried``; return a copy of ``carried``."""
        summed = all_sum([self.local[k] for k in SUM_KEYS], device)
        for key, value in zip(SUM_KEYS, summed, strict=True):
            self.carried[key] += value
        self.local = dict.fromkeys(SUM_KEYS, 0.0)
        return dict(self.carried)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA with ``amp``; nothing otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader,
    device: torch.device,
    epoch: int,
    *,
    tally: EpochTally | None = None,
    lr_at_step: Callable[[int], float] | None = None,
    after_step: Callable[[int], None] | None = None,
    uneven: bool = False,
    amp: bool = False,
    print_freq: int = 10,
    log: Callable[[str], None] = print,
    progress_bar: bool = False,
    stop: Callable[[], bool] | None = None,
    agree_steps: int | None = None,
    first_step: int = 0,
) -> EpochTally:
    """One pass over ``data_loader``: forward, backward and an optimizer step per batch.

    Parameters
    ----------
    model : nn.Module
        The model, wrapped in ``DistributedDataParallel`` when several processes train.
    criterion : nn.Module
        Loss on ``(logits [B, C], labels [B] int64)``.
    optimizer : torch.optim.Optimizer
        Stepped once per batch.
    data_loader : iterable
        Yields ``(images [B, 3, S, S] uint8 or float, labels [B])`` batches and has a ``len``.
    device : torch.device
        Where the model lives; :func:`lance_cookbook.to_device` moves and normalizes each batch.
    epoch : int
        Shown in the progress line.
    tally : EpochTally, optional
        Receives this rank's sums (a new one by default).
    lr_at_step : callable, optional
        Called with the index of each step of this pass before it runs; sets and returns the learning
        rate (e.g. :meth:`OneCycleSchedule.set_progress`).
    after_step : callable, optional
        Called with the number of steps of this pass done, after each step (checkpoints). Every rank
        calls it at the same steps, so it may run collectives while all ranks still have batches.
    uneven : bool
        Ranks have different numbers of batches (an elastic restart mid-epoch): run the pass inside
        ``DistributedDataParallel.join`` so the ranks that finish first shadow the others' all-reduces.
    amp : bool
        bfloat16 autocast on CUDA.
    print_freq : int
        A progress line every this many steps (0: none).
    log : callable
        Receives the progress lines (rank 0: ``print``; other ranks: a no-op).
    progress_bar : bool
        A tqdm bar (step, images/s, loss, data wait) instead of progress lines, for a terminal.
    stop : callable, optional
        Returns True once this rank has been asked to stop (SIGTERM:
        :class:`lance_cookbook.training.distributed.StopRequest`). Read after each step's backward; when
        any rank's says so, every rank applies that step, runs ``after_step`` and raises :class:`Stopped`.
    agree_steps : int, optional
        The leading steps of this pass in which every rank has a batch (default: all): in those, after each
        backward, one ``all_reduce`` of two numbers tells every rank whether any rank's loss is non-finite
        or any rank was asked to stop, so all leave at the same step. In later steps (the uneven tail of an
        elastic resume) no collective can run: each rank checks its own loss, and a stop waits for the
        epoch's end. A stop asked for at the last of these steps also waits for the epoch's end.
    first_step : int
        Steps of this epoch done before this pass (resuming): only for naming the step in errors.

    Returns
    -------
    EpochTally
        ``tally`` with this pass's sums in its ``local`` part; :meth:`EpochTally.fold` adds them up over
        ranks. Data-wait and step seconds are measured by :class:`DataWaitMeter`.

    Raises
    ------
    TrainingDiverged
        On every rank, at the first step whose loss is NaN or infinite on any rank, before its update.
    Stopped
        On every rank, after the step at which the ranks agreed to stop (see ``stop``).
    """
    tally = EpochTally() if tally is None else tally
    model.train()
    meter = DataWaitMeter()
    total = len(data_loader)
    agree_steps = total if agree_steps is None else agree_steps
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False)
    timed_wait = timed_step = 0.0  # the meter's sums already added to the tally
    joining = (
        model.join() if uneven and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    )
    with joining:
        for step, (images, labels) in enumerate(meter.wrap(data_loader)):
            # the meter closes a step when the next begins: add the steps it has closed so far
            tally.add(data_wait_s=meter.wait_s - timed_wait, step_s=meter.step_s - timed_step)
            timed_wait, timed_step = meter.wait_s, meter.step_s
            lr = lr_at_step(step) if lr_at_step is not None else optimizer.param_groups[0]["lr"]
            images, labels = to_device(
                (images, labels), device, IMAGENET_MEAN, IMAGENET_STD, channels_last=amp
            )
            with _autocast(device, amp):
                loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value, n = loss.item(), labels.numel()
            flags = [float(not math.isfinite(value)), float(stop is not None and stop())]
            if step < agree_steps:
                flags = all_sum(flags, device)  # identity when running alone
            if flags[0]:
                where = f" on {flags[0]:g} of the ranks" if dist.is_initialized() else ""
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}, step {first_step + step + 1}: the loss is not "
                    f"finite{where} (here {value:g}); that step was not applied and no checkpoint holds "
                    "it. Lower --lr, or look for bad inputs or low-precision overflow"
                )
            optimizer.step()
            tally.add(loss_sum=value * n, samples=n)
            if after_step is not None:
                after_step(step + 1)
            if flags[1] and step + 1 < agree_steps:
                tally.add(data_wait_s=meter.wait_s - timed_wait, step_s=meter.step_s - timed_step)
                if bar is not None:
                    bar.close()
                raise Stopped(step + 1)
            rate = n / meter.last_step_s if meter.last_step_s > 0 else 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:,.0f}", wait=f"{meter.wait_fraction:.0%}")
            elif print_freq > 0 and ((step + 1) % print_freq == 0 or step + 1 == total):
                log(
                    f"epoch {epoch} [{step + 1:>{len(str(total))}}/{total}] loss {value:.4f} lr {lr:.2e} "
                    f"{rate:,.0f} img/s, data wait {meter.last_wait_s * 1e3:.1f} ms "
                    f"({meter.wait_fraction:.0%} of step time so far)",
                    flush=True,
                )
    tally.add(data_wait_s=meter.wait_s - timed_wait, step_s=meter.step_s - timed_step)
    if bar is not None:
        bar.close()
    return tally


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, *, amp: bool = False) -> tuple[int, int]:
    """Count correct predictions over ``data_loader``, summed over all ranks.

    Parameters
    ----------
    model : nn.Module
        The model; a ``DistributedDataParallel`` wrapper is bypassed (shards may differ in length by
        one, and a DDP forward can run collectives that the shorter shard's rank never joins).
    data_loader : iterable
        One rank's shard, from a :class:`ShardSampler`, so every sample is counted exactly once.
    device : torch.device
        Where the model lives.
    amp : bool
        bfloat16 autocast on CUDA.

    Returns
    -------
    tuple of (int, int)
        ``(correct, seen)`` summed over all ranks; every rank gets the totals.
    """
    module = _unwrap(model)
    module.eval()
    correct = seen = 0
    for batch in data_loader:
        images, labels = to_device(batch, device, IMAGENET_MEAN, IMAGENET_STD, channels_last=amp)
        with _autocast(device, amp):
            correct += (module(images).argmax(1) == labels).sum().item()
        seen += labels.numel()
    correct, seen = all_sum([correct, seen], device)
    return int(correct), int(seen)
