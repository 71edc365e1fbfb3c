"""DDP training from Lance datasets: the recipe the notebooks teach, as a script torchrun launches.

    python -m torch.distributed.run --standalone --nproc_per_node N -m lance_cookbook.train \\
        --train data/digits-train.lance --val data/digits-test.lance --epochs 5 --metrics-out metrics.json

Runs as a plain single process too (``python -m lance_cookbook.train ...``). Uses nccl on CUDA and gloo on
CPU; :class:`ResumableDistributedSampler` (``DistributedSampler``'s order, with a saved place inside the
epoch; ``--sampler block``: :class:`BlockShuffleSampler`, which resumes the same way) + ``set_epoch`` for
training, an exactly-once :class:`ShardSampler` and an ``all_reduce`` of correct/seen counts for
evaluation. Every epoch reports how much of each step waited for data (:class:`DataWaitMeter`).

With ``--checkpoint-dir`` the run saves checkpoints (every ``--checkpoint-every`` steps and at every
epoch's end) and, when started again, resumes from the newest complete one at the next batch of the
interrupted epoch, also with another number of processes. Under ``torch.distributed.run --max-restarts N``
a killed rank costs only the steps since the last checkpoint.

Two environment variables serve tests and the chapter: ``LANCE_COOKBOOK_SAMPLE_LOG=PATH`` makes each
rank append ``{"epoch", "position", "index", "world"}`` JSON lines for every sample it trained on to
``PATH.rank{R}``; ``LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT=E:S`` makes every rank stop (sleep) once the
checkpoint after step ``S`` of epoch ``E`` is saved, so that a kill lands at a known place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .cli import add_storage_option_argument
from .dataset import DatasetNotFound, EmptyDataset, label_names
from .distributed import agreed_versions, all_sum, setup_distributed
from .engine import SUM_KEYS, EpochTally, evaluate, train_one_epoch
from .models import MODELS
from .reporting import (
    _quiet,
    describe_run,
    epoch_metrics,
    order_digest,
    record_epoch,
    tensorboard_writer,
    write_json,
)
from .run_state import Run, find_checkpoint, rng_state, set_rng_state
from .training_setup import build_loaders, build_training, count_classes, open_datasets, require_rows

# The loops, the setup steps and the run state live in their own modules; these names stay importable from
# here for the tests, the notebooks and older code.
__all__ = [
    "SUM_KEYS",
    "EpochTally",
    "Run",
    "agreed_versions",
    "all_sum",
    "build_loaders",
    "build_parser",
    "build_training",
    "cli",
    "count_classes",
    "describe_run",
    "epoch_metrics",
    "evaluate",
    "find_checkpoint",
    "main",
    "open_datasets",
    "order_digest",
    "record_epoch",
    "require_rows",
    "rng_state",
    "set_rng_state",
    "setup_distributed",
    "tensorboard_writer",
    "train_epoch",
    "train_one_epoch",
    "write_json",
]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to an option's help unless the help already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unstated = action.default is None or action.default is False or action.default == []
        if action.required or unstated or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lance_cookbook.train``; ``--help`` shows every default."""
    p = argparse.ArgumentParser(
        prog="python -m lance_cookbook.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
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
        type=Path,
        metavar="FILE",
        help="JSON written by rank 0 after every epoch (default: none)",
    )
    p.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="version of --train to read (default: the latest when the job starts, the same on every rank)",
    )
    p.add_argument(
        "--val-version",
        type=int,
        metavar="N",
        help="version of --val to read (default: the latest when the job starts, the same on every rank)",
    )
    add_storage_option_argument(
        p, "object-store option for both URIs (repeatable), e.g. aws_region=us-east-1 (default: none)"
    )
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help="save checkpoints here and resume from the newest complete one at start (default: none)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only)",
    )
    p.add_argument(
        "--log-dir", type=Path, metavar="DIR", help="write TensorBoard scalars here, rank 0 (default: none)"
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="CUDA only: autocast to bfloat16 and channels_last weights; ignored with a note on CPU "
        "(default: off)",
    )
    return p


def train_epoch(
    run: Run, epoch: int, model, optimizer, schedule, train_loader, val_loader, device, writer
) -> None:
    """One epoch of the recipe: train (from the checkpoint's place in it when resuming), evaluate exactly
    once, record the metrics, checkpoint."""
    args, sampler = run.args, train_loader.sampler
    sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank (kept when resuming)
    if epoch != run.epoch:
        run.epoch, run.step, run.tally = epoch, 0, EpochTally()
    b, amp = args.batch_size, args.amp and device.type == "cuda"

    def lr_at_step(step: int) -> float:
        return schedule.set_progress((epoch + sampler.consumed(step, b) / sampler.total_size) / args.epochs)

    train_one_epoch(
        model, nn.CrossEntropyLoss(), optimizer, train_loader, device, epoch,
        tally=run.tally, lr_at_step=lr_at_step,
        after_step=run.after_step_hook(model, optimizer, schedule, sampler, device),
        uneven=len(set(sampler.batches_per_rank(b))) > 1, amp=amp, print_freq=args.print_freq, log=run.log,
        progress_bar=run.rank == 0 and sys.stdout.isatty(),
    )  # fmt: skip
    sums = run.tally.fold(device)
    correct, val_seen = evaluate(model, val_loader, device, amp=amp)
    row = epoch_metrics(epoch, sums, correct, val_seen, order_digest(sampler.global_order()))
    record_epoch(run.metrics, row, args.metrics_out, run.rank, run.log)
    if writer is not None:
        for key in ("train_loss", "val_accuracy", "images_per_s", "data_wait_fraction"):
            writer.add_scalar(key, row[key], epoch)
        writer.add_scalar("learning_rate", optimizer.param_groups[0]["lr"], epoch)
    if args.checkpoint_dir:
        run.save(model, optimizer, schedule, sampler, sampler.total_size, run.step, device)


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate as the command line says; return the metrics (rank 0 also writes them).

    With ``--checkpoint-dir`` holding a checkpoint, the run resumes there; a run that had already
    finished trains nothing and says so.

    Raises
    ------
    DatasetNotFound, EmptyDataset
        A URI that holds no dataset, or an empty training or evaluation set.
    """
    args = build_parser().parse_args(argv)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else _quiet
    try:
        torch.manual_seed(args.seed)
        path, state = find_checkpoint(args.checkpoint_dir, rank, device)
        train_ds, val_ds, versions = open_datasets(
            args, rank, state["metrics"]["versions"] if state else None
        )
        train_loader, val_loader = build_loaders(args, train_ds, val_ds, rank, world)
        model, optimizer, schedule = build_training(args, count_classes(train_ds), device)
        run = Run(args, rank, world, versions, label_names(train_ds.uri, **train_ds.dataset_options))
        if state:
            run.restore(path, state, model, optimizer, schedule, train_loader.sampler)
        describe_run(args, world, device, train_ds, val_ds, versions, log)
        if state and run.epoch >= args.epochs:
            log(
                f"nothing to resume: the checkpoint {path} already finished all {args.epochs} epochs",
                flush=True,
            )
        with tensorboard_writer(args.log_dir, rank) as writer:
            for epoch in range(run.epoch, args.epochs):
                train_epoch(run, epoch, model, optimizer, schedule, train_loader, val_loader, device, writer)
        return run.finish(model)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: a bad or empty dataset ends in one ``error:`` line and exit 2."""
    try:
        main(argv)
    except (DatasetNotFound, EmptyDataset) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
