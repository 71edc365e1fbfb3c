"""The resumable state of a training run (:class:`Run`).

Metrics, epoch, step and sums carried from step to step, saved into checkpoints and restored from them, with
the random generators; and the ways a run stops early (:class:`TrainingDiverged`, :class:`Preempted`,
:class:`PeerLost`).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    checkpoint_name,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    state_sha256,
)
from .distributed import StopRequest, rank0_decides, unwrap
from .reporting import EpochTally, quiet, write_json


class TrainingDiverged(FloatingPointError):
    """A non-finite (NaN or infinite) training loss or weight; the message names the epoch and step.

    Raised on every rank at the same step, before the optimizer applies that step's update, so no weight
    and no checkpoint takes the non-finite values (t3-train-nan-loss-unnoticed; chainerui#16).
    """


class Preempted(Exception):
    """The run stopped at a step boundary after SIGTERM.

    Rank 0 checkpointed that step (when the run has a ``--checkpoint-dir``); ``str()`` is the line
    :func:`lance_cookbook.train.cli` prints.
    """

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
    """A stop was requested (SIGTERM) and the step failed because another rank is gone.

    ``torch.distributed.run`` sends SIGTERM to the survivors when one rank dies: the rank leaves without a
    checkpoint.
    """

    @classmethod
    def after(cls, error: BaseException) -> PeerLost:
        """The error to raise instead of ``error``, a step's failure after SIGTERM, naming its first line."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return cls(
            f"stopped after SIGTERM without a checkpoint: the step failed ({first}); another rank is "
            "probably gone, and the last checkpoint stands"
        )


def find_checkpoint(
    directory: str | Path | None,
    rank: int,
    device: torch.device,
    storage_options: dict[str, str] | None = None,
) -> tuple[str | Path | None, dict | None]:
    """The newest complete checkpoint in ``directory``, chosen by rank 0 and loaded by every rank.

    ``directory`` is a local folder or an ``s3://`` prefix.

    Rank 0 alone decides (as for dataset versions), so all ranks resume from the same file even if one
    checkpoint is damaged; each rank then loads it itself, onto its own device.

    Returns
    -------
    tuple
        ``(path, state)``, or ``(None, None)`` without a directory or without any checkpoint in it.

    Raises
    ------
    CheckpointError
        On every rank, when ``directory`` holds checkpoints and none loads (:func:`load_latest`).
    """
    if directory is None:
        return None, None
    loaded: dict = {}  # rank 0 keeps the state it loaded; the others load the path it chose

    def choose() -> str | None:
        path, loaded["state"] = load_latest(directory, map_location=device, storage_options=storage_options)
        return path

    path = rank0_decides(rank, choose, CheckpointError)
    if path is None:
        return None, None
    if loaded.get("state") is None:
        loaded["state"] = load_checkpoint(path, map_location=device, storage_options=storage_options)
    return path, loaded["state"]


def rng_state() -> dict:
    """The random number generators of this process (Python, NumPy, torch CPU and CUDA)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    # plain types only, so the checkpoint loads with torch.load(weights_only=True): no pickled objects
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (rank 0's generators, on every rank)."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an array before commit f32d649
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


AfterStep = Callable[["Run", object, int], None]
AfterCheckpoint = Callable[["Run", int, int], None]


class Run:
    """What one run carries from step to step and into its checkpoints.

    The metrics so far, the epoch and step it is at, the epoch's :class:`EpochTally`, where to save, and
    the hooks a harness (:mod:`lance_cookbook.testing`) may give :func:`lance_cookbook.train.main`.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line of ``python -m lance_cookbook.train``.
    rank, world : int
        This process's rank and the number of processes.
    selection : dict
        The rows read, recorded in the metrics and checkpoints: ``{"versions", "filters", "tags"}``, each
        ``{"train": ..., "val": ...}`` (:func:`lance_cookbook.training.setup.open_datasets`).
    names : list of str
        The training set's ``label_names``.
    stop : StopRequest, optional
        Set by SIGTERM; a new one by default.
    after_step : callable, optional
        ``after_step(run, sampler, done)`` on every rank after each optimizer step, ``done`` being the steps
        of this pass done (the sampler gives their samples). Not called by the script itself.
    after_checkpoint : callable, optional
        ``after_checkpoint(run, epoch, step)`` on every rank after each mid-epoch checkpoint. Not called by
        the script itself.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        rank: int,
        world: int,
        selection: dict,
        names: list[str],
        stop: StopRequest | None = None,
        after_step: AfterStep | None = None,
        after_checkpoint: AfterCheckpoint | None = None,
    ):
        self.args, self.rank, self.world = args, rank, world
        self.storage_options = dict(getattr(args, "storage_option", None) or []) or None
        self.stop = stop or StopRequest()
        self.after_step, self.after_checkpoint = after_step, after_checkpoint
        self.saved_at: tuple[int, int] | None = None  # (epoch, consumed) of the last checkpoint written
        self.last_path: str | None = None  # where rank 0 wrote it
        self.metrics: dict = {
            "world_size": world,
            "model": args.model,
            "label_names": names,
            **selection,
            "epochs": [],
            "resumes": [],
        }
        self.epoch = 0
        self.step = 0  # steps of the current epoch done before this pass
        self.tally = EpochTally()
        self.log = print if rank == 0 else quiet

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch``, unless it is the one a checkpoint resumes (then its step and sums stand)."""
        if epoch != self.epoch:
            self.epoch, self.step, self.tally = epoch, 0, EpochTally()

    def restore(self, path, state: dict, model, optimizer, schedule, sampler) -> None:
        """Load a checkpoint into the model, optimizer, schedule and sampler, and record the resume.

        ``--lr`` and ``--weight-decay`` given now win over the checkpoint's (:meth:`apply_command_line`).

        Raises
        ------
        CheckpointError
            The checkpoint holds another ``--model``, or its sampler another ``--seed``, ``--sampler``,
            block size or dataset length: the run cannot continue it.
        """
        config = state["config"]
        if config["model"] != self.args.model:
            raise CheckpointError(
                f"the checkpoint {path} holds a {config['model']!r} model, not {self.args.model!r}: "
                "use another --checkpoint-dir, or the same --model"
            )
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from None
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        self.metrics = {**state["metrics"], "world_size": self.world}
        self.epoch, self.step = state["sampler"]["epoch"], state["step"]
        self.tally = EpochTally(state["sums"])
        consumed = state["sampler"]["consumed"]
        if self.epoch < self.args.epochs:
            self.metrics["resumes"].append(
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    "samples_consumed": consumed,
                    "world_size": self.world,
                }
            )
        self.log(
            f"resumed from {path} at epoch {self.epoch}, step {self.step} ({consumed} samples of the epoch "
            f"done, saved by {config['world_size']} process(es), now {self.world})",
            flush=True,
        )
        self.apply_command_line(optimizer, schedule)

    def apply_command_line(self, optimizer, schedule) -> list[str]:
        """Give a restored optimizer and schedule this command line's ``--lr`` and ``--weight-decay``.

        ``--lr`` is the one-cycle peak. Says so in one line when they differ from the checkpoint's.

        The checkpoint's values silently won before (t3-ckpt-resume-ignores-lr, pytorch/examples#816). The
        schedule stays at the saved training progress, now with the new peak. These are the only
        hyperparameters a checkpoint restores over the command line; the others either apply as given
        (``--epochs``, ``--batch-size``, ``--image-size``, ``--augment``, ``--amp``) or are refused when they
        differ (``--model``, ``--seed``, ``--sampler``, ``--block-size``, versions and filters: they change
        what is being resumed).

        Returns
        -------
        list of str
            The changes, e.g. ``["--lr 0.3 (was 0.003)"]``; empty when the values agree.
        """
        changes = []
        if schedule.max_lr != self.args.lr:
            changes.append(f"--lr {self.args.lr:g} (was {schedule.max_lr:g})")
            schedule.max_lr = self.args.lr
            schedule.set_progress(schedule.progress)
        saved = sorted({group["weight_decay"] for group in optimizer.param_groups})
        if saved != [self.args.weight_decay]:
            changes.append(
                f"--weight-decay {self.args.weight_decay:g} (was {', '.join(f'{w:g}' for w in saved)})"
            )
            for group in optimizer.param_groups:
                group["weight_decay"] = self.args.weight_decay
        if changes:
            self.log(
                f"resuming with the command line's {' and '.join(changes)} instead of the checkpoint's: the "
                f"learning-rate schedule continues at progress {schedule.progress:.3f} with the new values",
                flush=True,
            )
        return changes

    def save(
        self, model, optimizer, schedule, sampler, consumed: int, step: int, device
    ) -> str | Path | None:
        """Fold the epoch's sums on all ranks; rank 0 writes the checkpoint.

        Rank 0 returns its path or URI as a string (others: None).

        Raises
        ------
        TrainingDiverged
            On every rank, when a weight or buffer is NaN or infinite: such a checkpoint would replace a
            good one (only two are kept) with one nothing can resume from (t3-train-nan-loss-unnoticed).
        """
        weights = unwrap(model).state_dict()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingDiverged(
                f"not saving the checkpoint of epoch {sampler.epoch}, step {step}: {len(bad)} tensor(s) hold "
                f"NaN or infinite values ({', '.join(bad[:3])}); lower --lr"
            )
        sums = self.tally.fold(device)
        epoch_done = consumed >= sampler.total_size
        self.saved_at = (sampler.epoch, consumed)
        if self.rank != 0:
            return None
        state = {
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "sampler": sampler.state_dict(consumed),
            "step": 0 if epoch_done else step,
            "sums": EpochTally().carried if epoch_done else sums,
            "metrics": self.metrics,
            "rng": rng_state(),
            "config": {"model": self.args.model, "world_size": self.world, "seed": self.args.seed},
        }
        epoch, done = state["sampler"]["epoch"], state["sampler"]["consumed"]
        name = checkpoint_name(epoch, done)
        saved = save_checkpoint(state, self.args.checkpoint_dir, name, storage_options=self.storage_options)
        self.last_path = str(saved)
        return self.last_path

    def finish(self, model: nn.Module) -> dict:
        """Add the final model's hash to the metrics, write them (rank 0) and return them."""
        self.metrics["final_state_sha256"] = state_sha256(unwrap(model))
        if self.rank == 0 and self.args.metrics_out:
            write_json(self.args.metrics_out, self.metrics, storage_options=self.storage_options)
        return self.metrics

    def step_done(self, model, optimizer, schedule, sampler, done: int, device) -> None:
        """Run the per-step work after each optimizer step.

        The ``after_step`` hook, and every ``--checkpoint-every`` steps a checkpoint (then the
        ``after_checkpoint`` hook).

        Every rank calls it at the same steps. Mid-epoch checkpoints are saved only while every rank still
        has a batch (a checkpoint is a collective); the epoch's last step is saved as the next epoch's start.
        """
        if self.after_step is not None:
            self.after_step(self, sampler, done)
        b, every, step = self.args.batch_size, self.args.checkpoint_every, self.step + done
        full = min(sampler.batches_per_rank(b))  # steps in which every rank has a batch
        if self.args.checkpoint_dir and every > 0 and step % every == 0 and done < full:
            self.save(model, optimizer, schedule, sampler, sampler.consumed(done, b), step, device)
            if self.after_checkpoint is not None:
                self.after_checkpoint(self, sampler.epoch, step)

    def preempted(self, model, optimizer, schedule, sampler, done: int, device) -> Preempted:
        """All ranks, after the step at which they agreed to stop: checkpoint it unless just saved.

        Returns
        -------
        Preempted
            The exception to raise; rank 0's names the checkpoint written.
        """
        consumed, step = sampler.consumed(done, self.args.batch_size), self.step + done
        checkpointing, path = self.args.checkpoint_dir is not None, None
        if checkpointing and self.saved_at != (sampler.epoch, consumed):  # not already saved after that step
            path = self.save(model, optimizer, schedule, sampler, consumed, step, device)
        elif checkpointing and self.rank == 0:
            path = self.last_path
        return Preempted(sampler.epoch, step, path, checkpointing, self.rank)
