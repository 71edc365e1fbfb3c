"""Building a training run from the command line: the datasets (at versions all ranks agree on), the
loaders, and the model, optimizer and schedule."""

from __future__ import annotations

import argparse

import lance
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .block_sampler import BlockShuffleSampler
from .collate import ImageCollate
from .dataset import EmptyDataset, label_names, open_dataset
from .distributed import agreed_versions
from .loader import make_loader
from .models import build_model
from .sampler import ResumableDistributedSampler, ShardSampler
from .schedule import OneCycleSchedule


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
    """The training loader (:class:`ResumableDistributedSampler`, or :class:`BlockShuffleSampler` with
    ``--sampler block``; both resume mid-epoch) and the exactly-once evaluation loader
    (:class:`ShardSampler`), both decoding to uint8 in their workers.

    Returns
    -------
    tuple
        ``(train_loader, val_loader)``; call ``train_loader.sampler.set_epoch(epoch)`` every epoch.
    """
    # DistributedSampler's padding: every rank gets the same number of samples and batches, so no rank
    # waits on a gradient all-reduce that another never starts (drop_last is not needed).
    kind = getattr(args, "sampler", "distributed")
    if kind == "block":
        sampler = BlockShuffleSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, block_size=args.block_size
        )
    else:
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
