"""DDP training from Lance datasets: the recipe the notebooks teach, as a script torchrun launches.

    python -m torch.distributed.run --standalone --nproc_per_node N -m lance_cookbook.train \\
        --train data/digits-train.lance --val data/digits-test.lance --epochs 5 --metrics-out metrics.json

Runs as a plain single process too (``python -m lance_cookbook.train ...``). Uses nccl on CUDA and gloo on
CPU; :class:`ResumableDistributedSampler` (``DistributedSampler``'s order, with a saved place inside the
epoch; ``--sampler block``: :class:`BlockShuffleSampler`, which resumes the same way) + ``set_epoch`` for
training, an exactly-once :class:`ShardSampler` and an ``all_reduce`` of correct/seen counts for
evaluation. Every epoch reports how much of each step waited for data (:class:`DataWaitMeter`).

With ``--checkpoint-dir`` (a local folder or an ``s3://`` prefix, reached with ``--storage-option``) the run
saves checkpoints (every ``--checkpoint-every`` steps and at every epoch's end) and, when started again,
resumes from the newest complete one at the next batch of the interrupted epoch, also with another number
of processes; ``--lr`` and ``--weight-decay`` given then replace the checkpoint's. Under
``torch.distributed.run --max-restarts N`` a killed rank costs only the steps since the last checkpoint.

SIGTERM (a spot instance's or SLURM's notice before SIGKILL) costs nothing: every rank finishes its step, the
ranks agree on that step, rank 0 checkpoints it, and the job exits with ``PREEMPTED_EXIT_CODE`` (75) after
``preempted at epoch E step S: checkpoint written to PATH``; the same command then resumes bit-identically.
A NaN or infinite loss stops every rank at that step with ``error: training diverged at epoch E, step S``
(exit 1), before the step is applied; checkpoints and metrics never hold non-finite values.

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
from .recipe.dataset import DatasetNotFound, EmptyDataset
from .training.checkpoint import CheckpointError, check_location
from .training.distributed import StopRequest, agreed_versions, all_sum, setup_distributed
from .training.engine import SUM_KEYS, EpochTally, Stopped, TrainingDiverged, evaluate, train_one_epoch
from .training.models import MODELS
from .training.reporting import (
    _quiet,
    describe_run,
    epoch_metrics,
    order_digest,
    record_epoch,
    tensorboard_writer,
    write_json,
)
from .training.run_state import Run, find_checkpoint, pinned_versions, rng_state, set_rng_state
from .training.setup import (
    LabelError,
    build_loaders,
    build_training,
    checked_label_names,
    count_classes,
    open_datasets,
    require_rows,
)

# The loops, the setup steps and the run state live in their own modules; these names stay importable from
# here for the tests, the notebooks and older code.
__all__ = [
    "PREEMPTED_EXIT_CODE",
    "Preempted",
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


# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": a scheduler or wrapper that
# sees it runs the same command again, which resumes from the checkpoint just written.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """The run stopped at a step boundary after SIGTERM; rank 0 checkpointed that step (when the run has a
    ``--checkpoint-dir``). ``str()`` is the line :func:`cli` prints."""

    def __init__(self, epoch: int, step: int, path: str | None, checkpointing: bool, rank: int):
        where = (
            f"checkpoint written to {path}"
            if path
            else (
                "checkpoint written by rank 0"
                if checkpointing
                else "no checkpoint written (no --checkpoint-dir)"
            )
        )
        super().__init__(f"preempted at epoch {epoch} step {step}: {where}")
        self.epoch, self.step, self.path, self.rank = epoch, step, path, rank


class PeerLost(RuntimeError):
    """A stop was requested (SIGTERM) and the step failed because another rank is gone (``torch.distributed.
    run`` sends SIGTERM to the survivors when one rank dies): the rank leaves without a checkpoint."""


def _location(text: str) -> str | Path:
    """argparse ``type=`` for where files go: a URI stays a string (``Path("s3://b/k")`` would be the local
    ``s3:/b/k``: syne-tune#232), anything else is a local ``Path``."""
    return text if "://" in text else Path(text)


def _local_dir(text: str) -> Path:
    """argparse ``type=`` for a folder that must be local (TensorBoard's ``--log-dir``)."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is a URI: TensorBoard logs go to a local folder")
    return Path(text)


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
        type=_location,
        metavar="FILE",
        help="JSON written by rank 0 after every epoch: a local path or s3://... (default: none)",
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
        type=_location,
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
        type=_local_dir,
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


def train_epoch(
    run: Run, epoch: int, model, optimizer, schedule, train_loader, val_loader, device, writer
) -> None:
    """One epoch of the recipe: train (from the checkpoint's place in it when resuming), evaluate exactly
    once, record the metrics, checkpoint.

    Raises
    ------
    Preempted
        On every rank, when a SIGTERM reached any rank (:class:`StopRequest`): after the step the ranks
        agreed on (mid-epoch), or after the epoch's checkpoint when the stop came too late in the epoch.
    TrainingDiverged
        On every rank, at the first non-finite loss (:func:`train_one_epoch`).
    """
    args, sampler = run.args, train_loader.sampler
    sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank (kept when resuming)
    if epoch != run.epoch:
        run.epoch, run.step, run.tally = epoch, 0, EpochTally()
    b, amp = args.batch_size, args.amp and device.type == "cuda"

    def lr_at_step(step: int) -> float:
        return schedule.set_progress((epoch + sampler.consumed(step, b) / sampler.total_size) / args.epochs)

    checkpointing = args.checkpoint_dir is not None
    try:
        train_one_epoch(
            model, nn.CrossEntropyLoss(), optimizer, train_loader, device, epoch,
            tally=run.tally, lr_at_step=lr_at_step,
            after_step=run.after_step_hook(model, optimizer, schedule, sampler, device),
            uneven=len(set(sampler.batches_per_rank(b))) > 1, amp=amp, print_freq=args.print_freq,
            log=run.log, progress_bar=run.rank == 0 and sys.stdout.isatty(), stop=run.stop,
            agree_steps=min(sampler.batches_per_rank(b)), first_step=run.step,
        )  # fmt: skip
    except Stopped as stopped:
        consumed, step = sampler.consumed(stopped.steps, b), run.step + stopped.steps
        path = None
        if checkpointing and run.saved_at != (epoch, consumed):  # not already saved after that step
            path = run.save(model, optimizer, schedule, sampler, consumed, step, device)
        elif checkpointing and run.rank == 0:
            path = run.last_path
        raise Preempted(epoch, step, path, checkpointing, run.rank) from None
    sums = run.tally.fold(device)
    correct, val_seen = evaluate(model, val_loader, device, amp=amp)
    row = epoch_metrics(epoch, sums, correct, val_seen, order_digest(sampler.global_order()))
    record_epoch(run.metrics, row, args.metrics_out, run.rank, run.log, run.storage_options)
    if writer is not None:
        for key in ("train_loss", "val_accuracy", "images_per_s", "data_wait_fraction"):
            writer.add_scalar(key, row[key], epoch)
        writer.add_scalar("learning_rate", optimizer.param_groups[0]["lr"], epoch)
    path = None
    if checkpointing:
        path = run.save(model, optimizer, schedule, sampler, sampler.total_size, run.step, device)
    # a SIGTERM during the epoch's last step or its evaluation: stop at the epoch's checkpoint
    if epoch + 1 < args.epochs and all_sum([float(run.stop.requested)], device)[0]:
        raise Preempted(epoch + 1, 0, path, checkpointing, run.rank)


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
    storage_options = dict(args.storage_option) or None
    for location in (args.checkpoint_dir, args.metrics_out):
        if location is not None:
            check_location(location, storage_options)  # before any process group or dataset
    rank, world, device = setup_distributed()
    log = print if rank == 0 else _quiet
    stop = StopRequest()
    try:
        with stop.installed():
            torch.manual_seed(args.seed)
            path, state = find_checkpoint(args.checkpoint_dir, rank, device, storage_options)
            train_ds, val_ds, versions = open_datasets(args, rank, pinned_versions(args, path, state))
            train_loader, val_loader = build_loaders(args, train_ds, val_ds, rank, world)
            model, optimizer, schedule = build_training(args, count_classes(train_ds), device)
            run = Run(args, rank, world, versions, checked_label_names(train_ds), stop)
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
                    train_epoch(
                        run, epoch, model, optimizer, schedule, train_loader, val_loader, device, writer
                    )
            return run.finish(model)
    except (RuntimeError, OSError) as e:
        if stop.requested and not isinstance(e, CheckpointError):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PeerLost(
                f"stopped after SIGTERM without a checkpoint: the step failed ({first}); another rank is "
                "probably gone, and the last checkpoint stands"
            ) from e
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: every expected way to stop is one line on stderr and an exit code.

    - 2: refused before training (``error:``): a bad or empty dataset, label_names that do not fit the
      labels, checkpoints that cannot be resumed, an unusable ``--checkpoint-dir``/``--metrics-out``;
    - 1: stopped during training (``error:``): a non-finite loss, or a SIGTERM while another rank failed;
    - ``PREEMPTED_EXIT_CODE`` (75): stopped at a step boundary after SIGTERM, ``preempted at epoch E step S:
      checkpoint written to PATH`` (rank 0); run the same command again to resume.
    """
    try:
        main(argv)
    except (DatasetNotFound, EmptyDataset, LabelError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, PeerLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        if e.rank == 0:
            print(e, file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
