"""DDP training from Lance datasets: the recipe the notebooks teach, as a script torchrun launches.

    python -m torch.distributed.run --standalone --nproc_per_node N -m lance_cookbook.train \\
        --train data/digits-train.lance --val data/digits-test.lance --epochs 5 --metrics-out metrics.json

Runs as a plain single process too (``python -m lance_cookbook.train ...``). Uses nccl on CUDA and gloo on
CPU; ``DistributedSampler`` + ``set_epoch`` for training, an exactly-once :class:`ShardSampler` and an
``all_reduce`` of correct/seen counts for evaluation. Every epoch reports how much of each step waited for
data (:class:`DataWaitMeter`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import lance
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .cli import add_storage_option_argument
from .collate import ImageCollate
from .dataset import DatasetNotFound, EmptyDataset, label_names, latest_version, open_dataset
from .device import IMAGENET_MEAN, IMAGENET_STD, to_device
from .loader import make_loader
from .meters import DataWaitMeter
from .models import MODELS, build_model
from .sampler import ShardSampler


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
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
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


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    data_loader,
    device: torch.device,
    epoch: int,
    *,
    print_freq: int = 10,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """One pass over ``data_loader``: forward, backward and an optimizer (and scheduler) step per batch.

    Parameters
    ----------
    model : nn.Module
        The model, wrapped in ``DistributedDataParallel`` when several processes train.
    criterion : nn.Module
        Loss on ``(logits [B, C], labels [B] int64)``.
    optimizer, scheduler
        Stepped once per batch; ``scheduler`` may be ``None``.
    data_loader : iterable
        Yields ``(images [B, 3, S, S] uint8 or float, labels [B])`` batches.
    device : torch.device
        Where the model lives; :func:`lance_cookbook.to_device` moves and normalizes each batch.
    epoch : int
        Shown in the progress line.
    print_freq : int
        A progress line (loss, images/s, share of the step spent waiting for data) every this many steps.
    log : callable
        Receives the progress lines (rank 0: ``print``; other ranks: a no-op).

    Returns
    -------
    dict of str to float
        This process's sums: ``loss_sum`` (loss x samples), ``samples``, ``steps``, ``data_wait_s`` and
        ``step_s`` (seconds, see :class:`DataWaitMeter`). Sum them over ranks with :func:`all_sum`.
    """
    model.train()
    meter = DataWaitMeter()
    loss_sum = samples = 0.0
    total = len(data_loader)
    for images, labels in meter.wrap(data_loader):
        images, labels = to_device((images, labels), device, IMAGENET_MEAN, IMAGENET_STD)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.item() * labels.numel()
        samples += labels.numel()
        step = meter.steps + 1  # the meter counts this step once the body returns
        if print_freq > 0 and (step % print_freq == 0 or step == total):
            log(
                f"epoch {epoch} [{step:>{len(str(total))}}/{total}] loss {loss.item():.4f} "
                f"data wait {meter.last_wait_s * 1e3:.1f} ms ({meter.wait_fraction:.0%} of steps so far)"
            )
    return {
        "loss_sum": loss_sum,
        "samples": samples,
        "steps": meter.steps,
        "data_wait_s": meter.wait_s,
        "step_s": meter.step_s,
    }


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device) -> tuple[int, int]:
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

    Returns
    -------
    tuple of (int, int)
        ``(correct, seen)`` summed over all ranks; every rank gets the totals.
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    module.eval()
    correct = seen = 0
    for batch in data_loader:
        images, labels = to_device(batch, device, IMAGENET_MEAN, IMAGENET_STD)
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


def open_datasets(args: argparse.Namespace, rank: int):
    """Open ``--train`` and ``--val`` at the versions rank 0 decides; refuse empty ones.

    Returns
    -------
    tuple
        ``(train_ds, val_ds, versions)``.
    """
    storage_options = dict(args.storage_option) or None
    versions = agreed_versions(
        {"train": args.train, "val": args.val},
        {"train": args.version, "val": args.val_version},
        storage_options,
        rank,
    )
    train_ds = open_dataset(args.train, version=versions["train"], storage_options=storage_options)
    val_ds = open_dataset(args.val, version=versions["val"], storage_options=storage_options)
    require_rows(train_ds, "training")
    require_rows(val_ds, "evaluation")
    return train_ds, val_ds, versions


def build_loaders(args: argparse.Namespace, train_ds, val_ds, rank: int, world: int):
    """The training loader (``DistributedSampler``) and the exactly-once evaluation loader
    (:class:`ShardSampler`), both decoding to uint8 in their workers.

    Returns
    -------
    tuple
        ``(train_loader, val_loader)``; call ``train_loader.sampler.set_epoch(epoch)`` every epoch.
    """
    # DistributedSampler pads so every rank gets the same number of samples and batches; no rank waits
    # on a gradient all-reduce that another never starts (drop_last is not needed).
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
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


def build_training(args: argparse.Namespace, num_classes: int, device: torch.device, steps: int):
    """The model (DDP-wrapped when several processes train), AdamW and a one-cycle schedule over
    ``steps`` optimizer steps.

    Returns
    -------
    tuple
        ``(model, optimizer, scheduler)``.
    """
    model = build_model(args.model, num_classes).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=max(1, steps))
    return model, optimizer, scheduler


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


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate as the command line says; return the metrics (rank 0 also writes them).

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
        train_ds, val_ds, versions = open_datasets(args, rank)
        train_loader, val_loader = build_loaders(args, train_ds, val_ds, rank, world)
        num_classes = count_classes(train_ds)
        model, optimizer, scheduler = build_training(
            args, num_classes, device, args.epochs * len(train_loader)
        )
        criterion = nn.CrossEntropyLoss()
        log(
            f"world size {world} on {device}; {len(train_ds):,} train rows (version {versions['train']}) / "
            f"{len(val_ds):,} val rows (version {versions['val']}), "
            f"{num_classes} classes, model {args.model}, {args.workers} worker(s) per process"
        )
        names = label_names(train_ds.uri, **train_ds.dataset_options)
        metrics = {"world_size": world, "model": args.model, "label_names": names, "versions": versions}
        metrics["epochs"] = []
        for epoch in range(args.epochs):
            train_loader.sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
            digest = order_digest(list(train_loader.sampler))
            sums = train_one_epoch(
                model, criterion, optimizer, scheduler, train_loader, device, epoch,
                print_freq=args.print_freq, log=log,
            )  # fmt: skip
            sums = dict(zip(sums, all_sum(list(sums.values()), device), strict=True))
            correct, val_seen = evaluate(model, val_loader, device)
            record_epoch(
                metrics, epoch_metrics(epoch, sums, correct, val_seen, digest), args.metrics_out, rank, log
            )
        return metrics
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
