"""The resumable state of a training run (:class:`Run`): metrics, epoch, step and sums carried from step
to step, saved into checkpoints and restored from them, with the random generators."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import checkpoint_name, load_latest, save_checkpoint, state_sha256
from .engine import EpochTally, _unwrap
from .faults import PAUSE_ENV
from .reporting import _quiet, write_json


def find_checkpoint(
    directory: Path | None, rank: int, device: torch.device
) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint in ``directory``, chosen by rank 0 and loaded by every rank.

    Rank 0 alone decides (as for dataset versions), so all ranks resume from the same file even if one
    checkpoint is damaged; each rank then loads it itself, onto its own device.

    Returns
    -------
    tuple
        ``(path, state)``, or ``(None, None)`` without a directory or a readable checkpoint.
    """
    if directory is None:
        return None, None
    chosen: list = [None]
    state = None
    if rank == 0:
        path, state = load_latest(directory, map_location=device)
        chosen[0] = str(path) if path else None
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None, None
    if state is None:
        state = torch.load(chosen[0], map_location=device, weights_only=True)
    return Path(chosen[0]), state


def rng_state() -> dict:
    """This process's random number generators (Python, NumPy, torch CPU and CUDA)."""
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
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Run:
    """What one run carries from step to step and into its checkpoints: the metrics so far, the epoch
    and step it is at, the epoch's :class:`EpochTally`, and where to save."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, versions: dict, names: list[str]):
        self.args, self.rank, self.world = args, rank, world
        self.metrics: dict = {
            "world_size": world,
            "model": args.model,
            "label_names": names,
            "versions": versions,
            "epochs": [],
            "resumes": [],
        }
        self.epoch = 0
        self.step = 0  # steps of the current epoch done before this pass
        self.tally = EpochTally()
        self.log = print if rank == 0 else _quiet
        self.sample_log = os.environ.get("LANCE_COOKBOOK_SAMPLE_LOG")
        self.pause_at = os.environ.get(PAUSE_ENV)

    def restore(self, path: Path, state: dict, model, optimizer, schedule, sampler) -> None:
        """Load a checkpoint into the model, optimizer, schedule and sampler, and record the resume."""
        if state["config"]["model"] != self.args.model:
            raise ValueError(
                f"the checkpoint {path} holds a {state['config']['model']!r} model, not {self.args.model!r}: "
                "use another --checkpoint-dir, or the same --model"
            )
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
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
            f"done, saved by {state['config']['world_size']} process(es), now {self.world})",
            flush=True,
        )

    def save(self, model, optimizer, schedule, sampler, consumed: int, step: int, device) -> None:
        """All ranks: fold the epoch's sums; rank 0 writes the checkpoint."""
        sums = self.tally.fold(device)
        if self.rank == 0:
            state = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "sampler": sampler.state_dict(consumed),
                "step": 0 if consumed >= sampler.total_size else step,
                "sums": EpochTally().carried if consumed >= sampler.total_size else sums,
                "metrics": self.metrics,
                "rng": rng_state(),
                "config": {"model": self.args.model, "world_size": self.world, "seed": self.args.seed},
            }
            epoch, done = state["sampler"]["epoch"], state["sampler"]["consumed"]
            save_checkpoint(state, self.args.checkpoint_dir, checkpoint_name(epoch, done))

    def finish(self, model: nn.Module) -> dict:
        """Add the final model's hash to the metrics, write them (rank 0) and return them."""
        self.metrics["final_state_sha256"] = state_sha256(_unwrap(model))
        if self.rank == 0 and self.args.metrics_out:
            write_json(self.args.metrics_out, self.metrics)
        return self.metrics

    def after_step_hook(self, model, optimizer, schedule, sampler, device) -> Callable[[int], None]:
        """The ``after_step`` of :func:`train_one_epoch`: sample log, mid-epoch checkpoints."""
        b, every = self.args.batch_size, self.args.checkpoint_every
        full = min(sampler.batches_per_rank(b))  # steps in which every rank has a batch
        order = sampler.global_order() if self.sample_log else None
        positions = sampler.positions()

        def after_step(done: int) -> None:
            if self.sample_log:
                with open(f"{self.sample_log}.rank{self.rank}", "a") as f:
                    for p in positions[(done - 1) * b : done * b]:
                        record = {
                            "epoch": sampler.epoch,
                            "position": p,
                            "index": order[p],
                            "world": self.world,
                        }
                        f.write(json.dumps(record) + "\n")
            step = self.step + done
            if self.args.checkpoint_dir and every > 0 and step % every == 0 and done < full:
                consumed = sampler.consumed(done, b)
                self.save(model, optimizer, schedule, sampler, consumed, step, device)
                if self.pause_at == f"{sampler.epoch}:{step}":
                    self.log(f"paused after the checkpoint of epoch {sampler.epoch}, step {step}", flush=True)
                    # a test or the chapter kills a rank here and torchrun then stops the others; should the
                    # launcher itself die first (a failed test, an interrupted cell), leave instead of
                    # sleeping for ever as an orphan
                    launcher = os.getppid()
                    while os.getppid() == launcher:
                        time.sleep(1)
                    raise SystemExit("the launcher is gone: leaving the pause")

        return after_step
