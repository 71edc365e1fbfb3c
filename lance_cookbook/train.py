r"""DDP training from Lance datasets: the recipe the notebooks teach, as a script torchrun launches.

    python -m torch.distributed.run --standalone --nproc_per_node N -m lance_cookbook.train \
        --train data/digits-train.lance --val data/digits-test.lance --epochs 5 --metrics-out metrics.json

Runs as a plain single process too. Checkpoints (``--checkpoint-dir``, local or ``s3://``), resuming on
another number of processes, SIGTERM (exit 75, ``PREEMPTED_EXIT_CODE``) and a NaN loss (exit 1): see
docs/training.md. Read top to bottom: the command line, the loaders, one epoch, the evaluation, ``main``;
the machinery is in :mod:`lance_cookbook.training`; test hooks are in :mod:`lance_cookbook.testing`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .cli import add_storage_option_argument
from .recipe.block_sampler import BlockShuffleSampler
from .recipe.collate import ImageCollate
from .recipe.dataset import DatasetNotFound, EmptyDataset, InvalidFilter
from .recipe.device import IMAGENET_MEAN, IMAGENET_STD, to_device
from .recipe.loader import make_loader
from .recipe.sampler import ResumableDistributedSampler, ShardSampler
from .training import reporting, run_state, setup
from .training.arguments import HelpFormatter, add_selection_arguments, local_dir, location
from .training.checkpoint import CheckpointError, check_location
from .training.distributed import StopRequest, all_sum, distribute, ignore_sigterm, setup_distributed, unwrap
from .training.models import MODELS, build_model
from .training.reporting import order_digest
from .training.run_state import Run
from .training.schedule import OneCycleSchedule

__all__ = ["PREEMPTED_EXIT_CODE", "build_parser", "cli", "evaluate", "load_data", "main", "train_one_epoch"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h, "temporary failure, retry": the same command resumes


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lance_cookbook.train``; ``--help`` shows every default."""
    p = argparse.ArgumentParser(
        prog="python -m lance_cookbook.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--train", required=True, metavar="URI", help="training Lance dataset (path or s3://...)")
    p.add_argument(
        "--val",
        required=True,
        metavar="URI",
        help="held-out Lance dataset, evaluated exactly once per sample",
    )
    p.add_argument("--epochs", type=int, default=5, metavar="N", help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per step per process")
    p.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="peak learning rate of the one-cycle schedule, per optimizer step",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        metavar="WD",
        help="AdamW decoupled weight decay, per step x lr",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="DataLoader worker processes per process (0: none)",
    )
    p.add_argument(
        "--sampler",
        default="distributed",
        choices=("distributed", "block"),
        help="training order: 'distributed' is DistributedSampler's random permutation; 'block' shuffles "
        "blocks of --block-size consecutive rows (BlockShuffleSampler: cheaper contiguous reads, as "
        "random as the rows' order on disk allows)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=64,
        metavar="ROWS",
        help="with --sampler block: consecutive rows per block, about the per-process batch size",
    )
    p.add_argument(
        "--image-size", type=int, default=32, metavar="PX", help="side of the square input, pixels"
    )
    p.add_argument("--model", default="cnn", choices=MODELS, help="architecture, random initial weights")
    p.add_argument(
        "--augment", action="store_true", help="RandomResizedCrop + flip on the training set (default: off)"
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seeds the weights and every epoch's sample order"
    )
    p.add_argument(
        "--print-freq",
        type=int,
        default=10,
        metavar="STEPS",
        help="rank 0 prints a progress line every N steps",
    )
    p.add_argument(
        "--metrics-out",
        type=location,
        metavar="FILE",
        help="JSON written by rank 0 after every epoch: a local path or s3://... (default: none)",
    )
    add_selection_arguments(p)  # --version, --val-version (a number or a tag), --filter, --val-filter (SQL)
    add_storage_option_argument(
        p, "object-store option for both URIs (repeatable), e.g. aws_region=us-east-1 (default: none)"
    )
    p.add_argument(
        "--checkpoint-dir",
        type=location,
        metavar="DIR",
        help="save checkpoints here (a local folder or s3://...) and resume from the newest complete one at "
        "start (default: none)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only)",
    )
    p.add_argument(
        "--log-dir",
        type=local_dir,
        metavar="DIR",
        help="write TensorBoard scalars to this local folder, rank 0 (default: none)",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="CUDA only: autocast to bfloat16 and channels_last weights; ignored with a note on CPU "
        "(default: off)",
    )
    return p


def load_data(args: argparse.Namespace, train_ds, val_ds, rank: int, world: int):
    """The training loader and the exactly-once evaluation loader, both decoding to uint8 in their workers.

    With ``--augment`` each sample's crop and flip come from a seed of (``--seed``, epoch, position), not
    from the workers' generators, so a resumed run is bit-identical to an uninterrupted one. The workers
    ignore SIGTERM, so a preempted rank can finish its step.

    Returns
    -------
    tuple
        ``(train_loader, val_loader)``; call ``train_loader.sampler.set_epoch(epoch)`` every epoch.
    """
    # DistributedSampler's padding: every rank gets the same number of batches, so no rank waits on a
    # gradient all-reduce that another never starts. Both samplers resume mid-epoch from a checkpoint.
    if args.sampler == "block":
        sampler = BlockShuffleSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, block_size=args.block_size
        )
    else:
        sampler = ResumableDistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed
        )
    if args.augment:
        train_ds, sampler = setup.SeededRows(train_ds, args.seed), setup.EpochPositions(sampler)
    train_loader = make_loader(
        train_ds,
        batch_size=args.batch_size,
        num_workers=args.workers,
        sampler=sampler,
        collate_fn=ImageCollate(
            args.image_size, train=args.augment, decoder="torchvision", dtype=torch.uint8
        ),
        worker_init_fn=ignore_sigterm,
    )
    val_loader = make_loader(
        val_ds,
        batch_size=args.batch_size,
        num_workers=args.workers,
        sampler=ShardSampler(val_ds, num_replicas=world, rank=rank),  # each rank's shard, unpadded
        collate_fn=ImageCollate(args.image_size, train=False, decoder="torchvision", dtype=torch.uint8),
        worker_init_fn=ignore_sigterm,
    )
    return train_loader, val_loader


def train_one_epoch(model, criterion, optimizer, schedule, data_loader, device, epoch: int, run: Run) -> None:
    """One pass over ``data_loader``: forward, backward and an optimizer step per batch.

    ``data_loader``'s sampler says where in the epoch each step is, and ``schedule`` sets the learning rate
    from it. ``run`` (:class:`lance_cookbook.training.run_state.Run`) holds the command line, the steps done
    before this pass, the epoch's sums (``run.tally``: its meter times the data waits), the stop request and
    the work after each step (:meth:`Run.step_done`: hooks, mid-epoch checkpoints).

    Raises
    ------
    TrainingDiverged
        On every rank, at the first step whose loss is NaN or infinite on any rank, before its update.
    Preempted
        On every rank, after the step at which the ranks agreed to stop (a SIGTERM reached one of them),
        once that step is checkpointed.
    """
    args, sampler, meter = run.args, data_loader.sampler, run.tally.meter
    per_rank = sampler.batches_per_rank(args.batch_size)
    # While every rank has a batch, an all_reduce of two flags after each backward (a non-finite loss, a stop)
    # makes all ranks leave at the same step. In the uneven tail of an elastic resume each rank checks its
    # own loss, a stop waits for the epoch's end, and DDP's join shadows the finished ranks' all-reduces.
    agree_steps, amp, total = min(per_rank), args.amp and device.type == "cuda", len(data_loader)
    uneven = len(set(per_rank)) > 1 and isinstance(model, DistributedDataParallel)
    model.train()
    with model.join() if uneven else contextlib.nullcontext():
        for step, (images, labels) in enumerate(meter.wrap(data_loader)):
            done = sampler.consumed(step, args.batch_size) / sampler.total_size
            lr = schedule.set_progress((epoch + done) / args.epochs)
            images, labels = to_device(
                (images, labels), device, IMAGENET_MEAN, IMAGENET_STD, channels_last=amp
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value, n = loss.item(), labels.numel()
            flags = [float(not math.isfinite(value)), float(run.stop.requested)]
            if step < agree_steps:
                flags = all_sum(flags, device)  # identity when running alone
            if flags[0]:
                where = f" on {flags[0]:g} of the ranks" if dist.is_initialized() else ""
                raise run_state.TrainingDiverged(
                    f"training diverged at epoch {epoch}, step {run.step + step + 1}: the loss is not "
                    f"finite{where} (here {value:g}); that step was not applied and no checkpoint holds "
                    "it. Lower --lr, or look for bad inputs or low-precision overflow"
                )
            optimizer.step()
            run.tally.add(value, n)
            run.step_done(model, optimizer, schedule, sampler, step + 1, device)
            if flags[1] and step + 1 < agree_steps:
                raise run.preempted(model, optimizer, schedule, sampler, step + 1, device)
            if args.print_freq > 0 and ((step + 1) % args.print_freq == 0 or step + 1 == total):
                rate = n / meter.last_step_s if meter.last_step_s > 0 else 0.0
                run.log(
                    f"epoch {epoch} [{step + 1:>{len(str(total))}}/{total}] loss {value:.4f} lr {lr:.2e} "
                    f"{rate:,.0f} img/s, data wait {meter.last_wait_s * 1e3:.1f} ms "
                    f"({meter.wait_fraction:.0%} of step time since the last checkpoint)",
                    flush=True,
                )


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, *, amp: bool = False) -> tuple[int, int]:
    """Count correct predictions over ``data_loader``, summed over all ranks.

    ``data_loader`` reads one rank's shard (:class:`ShardSampler`), so every sample counts exactly once.
    A ``DistributedDataParallel`` wrapper is bypassed: shards may differ in length by one, and a DDP
    forward can run collectives that the shorter shard's rank never joins. ``amp``: bfloat16 on CUDA.

    Returns
    -------
    tuple of (int, int)
        ``(correct, seen)`` summed over all ranks; every rank gets the totals.
    """
    module = unwrap(model)
    module.eval()
    correct = seen = 0
    for batch in data_loader:
        images, labels = to_device(batch, device, IMAGENET_MEAN, IMAGENET_STD, channels_last=amp)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            correct += (module(images).argmax(1) == labels).sum().item()
        seen += labels.numel()
    correct, seen = all_sum([correct, seen], device)
    return int(correct), int(seen)


def fit(run: Run, model, optimizer, schedule, train_loader, val_loader, device) -> None:
    """Train from ``run``'s epoch to ``--epochs``: each epoch trains, evaluates, reports and checkpoints.

    Raises
    ------
    Preempted
        On every rank, when a SIGTERM reached any rank: after the step the ranks agreed on (mid-epoch), or
        after the epoch's checkpoint when the stop came too late in the epoch.
    TrainingDiverged
        On every rank, at the first non-finite loss (:func:`train_one_epoch`).
    """
    args, sampler, criterion = run.args, train_loader.sampler, nn.CrossEntropyLoss()
    amp, checkpointing = args.amp and device.type == "cuda", args.checkpoint_dir is not None
    with reporting.tensorboard_writer(args.log_dir, run.rank) as writer:
        for epoch in range(run.epoch, args.epochs):
            sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank (kept when resuming)
            run.start_epoch(epoch)
            train_one_epoch(model, criterion, optimizer, schedule, train_loader, device, epoch, run)
            sums = run.tally.fold(device)
            correct, seen = evaluate(model, val_loader, device, amp=amp)
            row = reporting.epoch_metrics(epoch, sums, correct, seen, order_digest(sampler.global_order()))
            reporting.record_epoch(run.metrics, row, args.metrics_out, run.rank, run.log, run.storage_options)
            reporting.write_scalars(writer, row, optimizer.param_groups[0]["lr"], epoch)
            path = None
            if checkpointing:
                path = run.save(model, optimizer, schedule, sampler, sampler.total_size, run.step, device)
            # a SIGTERM during the epoch's last step or its evaluation: stop at the epoch's checkpoint
            if epoch + 1 < args.epochs and all_sum([float(run.stop.requested)], device)[0]:
                raise run_state.Preempted(epoch + 1, 0, path, checkpointing, run.rank)


def main(argv: list[str] | None = None, *, after_step=None, after_checkpoint=None) -> dict:
    """Train and evaluate as the command line says; return the metrics (rank 0 also writes them).

    With ``--checkpoint-dir`` holding a checkpoint, the run resumes there (a finished run trains nothing).
    ``after_step``, ``after_checkpoint``: test hooks (:mod:`lance_cookbook.testing`), given to :class:`Run`.

    Raises
    ------
    DatasetNotFound, EmptyDataset, InvalidFilter
        A URI, version or tag that holds no dataset (or a version removed while training reads it); an empty
        training or evaluation set or filter match; a filter that is not a Lance SQL predicate.
    """
    args = build_parser().parse_args(argv)
    storage_options = dict(args.storage_option) or None
    for where in (args.checkpoint_dir, args.metrics_out):
        if where is not None:
            check_location(where, storage_options)  # before any process group or dataset
    rank, world, device = setup_distributed()
    stop = StopRequest()
    try:
        with stop.installed():
            torch.manual_seed(args.seed)
            path, state = run_state.find_checkpoint(args.checkpoint_dir, rank, device, storage_options)
            train_ds, val_ds, selection = setup.open_datasets(args, rank, path, state)  # resumed: same rows
            train_loader, val_loader = load_data(args, train_ds, val_ds, rank, world)
            model = build_model(args.model, setup.count_classes(train_ds))
            model = distribute(model, device, channels_last=args.amp and device.type == "cuda")
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            schedule = OneCycleSchedule(optimizer, max_lr=args.lr)  # read at training progress, not steps
            names = setup.checked_label_names(train_ds)
            run = Run(args, rank, world, selection, names, stop, after_step, after_checkpoint)
            if state:
                run.restore(path, state, model, optimizer, schedule, train_loader.sampler)
            reporting.describe_run(args, world, device, train_ds, val_ds, run.log)
            if state and run.epoch >= args.epochs:
                done = f"the checkpoint {path} already finished all {args.epochs} epochs"
                run.log(f"nothing to resume: {done}", flush=True)
            fit(run, model, optimizer, schedule, train_loader, val_loader, device)
            return run.finish(model)
    except (RuntimeError, OSError) as e:
        if stop.requested and not isinstance(e, CheckpointError):
            raise run_state.PeerLost.after(e) from e
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None, **hooks) -> int:  # hooks: main's after_step, after_checkpoint
    """``main`` for the command line: every expected way to stop is one line on stderr and an exit code.

    - 2: refused before training (``error:``): a bad or empty dataset, version, tag or filter, label_names
      that do not fit the labels, checkpoints that cannot be resumed (or not on these rows), an unusable
      ``--checkpoint-dir``/``--metrics-out``; also a dataset version removed while training reads it;
    - 1: stopped during training (``error:``): a non-finite loss, or a SIGTERM while another rank failed;
    - ``PREEMPTED_EXIT_CODE`` (75): stopped at a step boundary after SIGTERM, ``preempted at epoch E step S:
      checkpoint written to PATH`` (rank 0); run the same command again to resume.
    """
    try:
        main(argv, **hooks)
    except (DatasetNotFound, EmptyDataset, InvalidFilter, setup.LabelError, CheckpointError) as e:
        print(f"error: {reporting.error_line(e)}", file=sys.stderr)  # also raised in a loader's worker
        return 2
    except (run_state.TrainingDiverged, run_state.PeerLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except run_state.Preempted as e:
        if e.rank == 0:
            print(e, file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    from .testing import hooks_from_env  # what a test's environment asks for (a pause, a sample log), or none

    sys.exit(cli(sys.argv[1:], **hooks_from_env()))
