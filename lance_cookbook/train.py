"""DDP training from Lance datasets: the recipe the notebooks teach, as a script torchrun launches.

    python -m torch.distributed.run --standalone --nproc_per_node N -m lance_cookbook.train \\
        --train data/digits-train.lance --val data/digits-test.lance --epochs 5 --metrics-out metrics.json

Runs as a plain single process too (``python -m lance_cookbook.train ...``). Uses nccl on CUDA and gloo on
CPU; :class:`ResumableDistributedSampler` (``DistributedSampler``'s order, with a saved place inside the
epoch) + ``set_epoch`` for training, an exactly-once :class:`ShardSampler` and an ``all_reduce`` of
correct/seen counts for evaluation. Every epoch reports how much of each step waited for data
(:class:`DataWaitMeter`).

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
import contextlib
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lance
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import checkpoint_name, load_latest, save_checkpoint, state_sha256
from .cli import add_storage_option_argument
from .collate import ImageCollate
from .dataset import DatasetNotFound, EmptyDataset, label_names, latest_version, open_dataset
from .device import IMAGENET_MEAN, IMAGENET_STD, to_device
from .loader import make_loader
from .meters import DataWaitMeter
from .models import MODELS, build_model
from .sampler import ResumableDistributedSampler, ShardSampler
from .schedule import OneCycleSchedule

SUM_KEYS = ("loss_sum", "samples", "data_wait_s", "step_s")


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


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all ranks in float64 (identity when running alone)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agreed_versions(
    uris: dict[str, str], requested: dict[str, int | None], storage_options: dict | None, rank: int
) -> dict[str, int]:
    """The dataset version each rank reads, decided once by rank 0 and broadcast before any rank opens
    the data.

    Each rank resolving "latest" itself can see a different version when a writer commits while the job
    starts; ranks then disagree on the dataset length, run different numbers of steps and hang in a
    gradient ``all_reduce``.

    Parameters
    ----------
    uris : dict of str to str
        A name (``"train"``) to its URI.
    requested : dict of str to int or None
        The same names to a version number, or ``None`` for the latest.
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
        On every rank, when rank 0 cannot open a URI.
    """
    decided: list = [None]
    if rank == 0:
        try:
            decided[0] = {
                name: requested[name]
                if requested[name] is not None
                else latest_version(uri, storage_options=storage_options)
                for name, uri in uris.items()
            }
        except DatasetNotFound as e:
            decided[0] = e
    if dist.is_initialized():
        dist.broadcast_object_list(decided, src=0)
    if isinstance(decided[0], Exception):
        raise decided[0]
    return decided[0]


def require_rows(dataset, role: str) -> None:
    """Raise :class:`EmptyDataset` naming ``role``, the URI and the version when ``dataset`` has no rows:
    training on nothing would otherwise report loss 0 and exit 0 with an untrained model."""
    if len(dataset) == 0:
        raise EmptyDataset(
            f"the {role} set {dataset.uri!r} (version {dataset.version}) is empty: it has 0 rows"
        )


def count_classes(dataset) -> int:
    """The number of classes of ``dataset``: its stored ``label_names``, else the largest label + 1.

    Parameters
    ----------
    dataset : LanceImageDataset
        From :func:`lance_cookbook.open_dataset`; read at its pinned version with its storage options.

    Returns
    -------
    int
        At least 1.
    """
    names = label_names(dataset.uri, **dataset.dataset_options)
    if names:
        return len(names)
    labels = lance.dataset(dataset.uri, **dataset.dataset_options).to_table(columns=["label"])["label"]
    return max(1, int(labels.to_numpy().max()) + 1)


def order_digest(indices: list[int]) -> str:
    """A 16-hex-digit digest of a sample order: equal digests, equal orders."""
    return hashlib.sha1(json.dumps(indices).encode()).hexdigest()[:16]


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

    Returns
    -------
    EpochTally
        ``tally`` with this pass's sums in its ``local`` part; :meth:`EpochTally.fold` adds them up over
        ranks. Data-wait and step seconds are measured by :class:`DataWaitMeter`.
    """
    tally = EpochTally() if tally is None else tally
    model.train()
    meter = DataWaitMeter()
    total = len(data_loader)
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
            optimizer.step()
            value, n = loss.item(), labels.numel()
            tally.add(loss_sum=value * n, samples=n)
            if after_step is not None:
                after_step(step + 1)
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


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a crash leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def open_datasets(args: argparse.Namespace, rank: int, pinned: dict[str, int] | None = None):
    """Open ``--train`` and ``--val`` at the versions rank 0 decides (``pinned``: those of the checkpoint
    being resumed, so the resumed epoch reads the rows it began with); refuse empty ones.

    Returns
    -------
    tuple
        ``(train_ds, val_ds, versions)``.
    """
    storage_options = dict(args.storage_option) or None
    versions = agreed_versions(
        {"train": args.train, "val": args.val},
        pinned or {"train": args.version, "val": args.val_version},
        storage_options,
        rank,
    )
    train_ds = open_dataset(args.train, version=versions["train"], storage_options=storage_options)
    val_ds = open_dataset(args.val, version=versions["val"], storage_options=storage_options)
    require_rows(train_ds, "training")
    require_rows(val_ds, "evaluation")
    return train_ds, val_ds, versions


def build_loaders(args: argparse.Namespace, train_ds, val_ds, rank: int, world: int):
    """The training loader (:class:`ResumableDistributedSampler`) and the exactly-once evaluation loader
    (:class:`ShardSampler`), both decoding to uint8 in their workers.

    Returns
    -------
    tuple
        ``(train_loader, val_loader)``; call ``train_loader.sampler.set_epoch(epoch)`` every epoch.
    """
    # DistributedSampler's padding: every rank gets the same number of samples and batches, so no rank
    # waits on a gradient all-reduce that another never starts (drop_last is not needed).
    sampler = ResumableDistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed
    )
    train_loader = make_loader(
        train_ds,
        batch_size=args.batch_size,
        num_workers=args.workers,
        sampler=sampler,
        collate_fn=ImageCollate(
            args.image_size, train=args.augment, decoder="torchvision", dtype=torch.uint8
        ),
    )
    val_loader = make_loader(
        val_ds,
        batch_size=args.batch_size,
        num_workers=args.workers,
        sampler=ShardSampler(val_ds, num_replicas=world, rank=rank),
        collate_fn=ImageCollate(args.image_size, train=False, decoder="torchvision", dtype=torch.uint8),
    )
    return train_loader, val_loader


def build_training(args: argparse.Namespace, num_classes: int, device: torch.device):
    """The model (DDP-wrapped when several processes train), AdamW and a one-cycle schedule read at
    training progress (:class:`OneCycleSchedule`).

    Returns
    -------
    tuple
        ``(model, optimizer, schedule)``.
    """
    model = build_model(args.model, num_classes).to(device)
    if args.amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # convolutions run faster in NHWC on GPUs
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return model, optimizer, OneCycleSchedule(optimizer, max_lr=args.lr)


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


def record_epoch(metrics: dict, row: dict, path: Path | None, rank: int, log: Callable) -> None:
    """Append ``row`` to ``metrics``, print it on rank 0 and rewrite ``path`` there (atomically)."""
    metrics["epochs"].append(row)
    log(
        f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, val acc {row['val_accuracy']:.2%} "
        f"({row['val_samples_seen']} samples), {row['images_per_s']:,.0f} img/s, "
        f"{row['data_wait_fraction']:.0%} of step time waiting for data",
        flush=True,
    )
    if rank == 0 and path:
        write_json(path, metrics)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


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
        state = torch.load(chosen[0], map_location=device, weights_only=False)
    return Path(chosen[0]), state


def rng_state() -> dict:
    """This process's random number generators (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (rank 0's generators, on every rank)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        self.pause_at = os.environ.get("LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT")

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
                    while True:  # a test or the chapter kills a rank here; torchrun then stops the others
                        time.sleep(1)

        return after_step


def describe_run(args, world: int, device: torch.device, train_ds, val_ds, versions: dict, log) -> None:
    """Rank 0's opening line: world, device, data, versions, model; a note when ``--amp`` cannot apply."""
    log(
        f"world size {world} on {device}; {len(train_ds):,} train rows (version {versions['train']}) / "
        f"{len(val_ds):,} val rows (version {versions['val']}), model {args.model}, "
        f"{args.workers} worker(s) per process",
        flush=True,
    )
    if args.amp and device.type != "cuda":
        log("--amp: no CUDA device, so no autocast and no channels_last: training in float32", flush=True)


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
