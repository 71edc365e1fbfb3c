"""DDP training from Lance datasets: the recipe the notebooks teach, as a script torchrun launches.

    python -m torch.distributed.run --standalone --nproc_per_node N -m lance_cookbook.train \\
        --train data/digits-train.lance --val data/digits-test.lance --epochs 5 --metrics-out metrics.json

Runs as a plain single process too (``python -m lance_cookbook.train ...``). Uses nccl on CUDA and gloo on
CPU; ``DistributedSampler`` + ``set_epoch`` for training, an exactly-once :class:`ShardSampler` and an
``all_reduce`` of correct/seen counts for evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lance
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from data_prep.convert import add_storage_option_argument

from .collate import ImageCollate
from .dataset import DatasetNotFound, EmptyDataset, label_names, latest_version, open_dataset
from .device import IMAGENET_MEAN, IMAGENET_STD, to_device
from .loader import make_loader
from .models import MODELS, build_model
from .sampler import ShardSampler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lance_cookbook.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training Lance URI")
    p.add_argument("--val", required=True, help="held-out Lance URI (evaluated exactly once per sample)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--augment", action="store_true", help="RandomResizedCrop + flip on the training set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-out", type=Path, help="JSON file written by rank 0 after every epoch")
    p.add_argument(
        "--version",
        type=int,
        help="version of --train to read (default: the latest when the job starts, the same on every rank)",
    )
    p.add_argument(
        "--val-version",
        type=int,
        help="version of --val to read (default: the latest when the job starts, the same on every rank)",
    )
    add_storage_option_argument(
        p, "object-store option for both URIs (repeatable), e.g. aws_region=us-east-1"
    )
    return p


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone."""
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
    """Sum numbers over all ranks (identity when running alone)."""
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
    gradient ``all_reduce``. ``requested`` maps a name (``"train"``) to a version number or ``None``
    (latest). Raises :class:`DatasetNotFound` on every rank when rank 0 cannot open a URI.
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


def order_digest(indices: list[int]) -> str:
    return hashlib.sha1(json.dumps(indices).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[int, int]:
    """Return ``(correct, seen)`` summed over all ranks; each sample is counted exactly once."""
    # the bare module: shards may differ in length by one, and a DDP forward can run collectives
    module = model.module if isinstance(model, DistributedDataParallel) else model
    module.eval()
    correct = seen = 0
    for batch in loader:
        images, labels = to_device(batch, device, IMAGENET_MEAN, IMAGENET_STD)
        correct += (module(images).argmax(1) == labels).sum().item()
        seen += labels.numel()
    correct, seen = all_sum([correct, seen], device)
    return int(correct), int(seen)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        torch.manual_seed(args.seed)
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
        names = label_names(args.train, version=versions["train"], storage_options=storage_options)
        num_classes = len(names) or (
            int(
                lance.dataset(args.train, version=versions["train"], storage_options=storage_options)
                .to_table(columns=["label"])["label"]
                .to_numpy()
                .max()
            )
            + 1
        )
        # Training: DistributedSampler pads so every rank gets the same number of samples and batches;
        # no rank waits on a gradient all-reduce that another never starts (drop_last is not needed).
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
        model = build_model(args.model, num_classes).to(device)
        if world > 1:
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=max(1, args.epochs * len(train_loader))
        )
        loss_fn = nn.CrossEntropyLoss()
        log(
            f"world size {world} on {device}; {len(train_ds):,} train rows (version {versions['train']}) / "
            f"{len(val_ds):,} val rows (version {versions['val']}), "
            f"{num_classes} classes, model {args.model}, {args.workers} worker(s) per process"
        )
        metrics: dict = {
            "world_size": world,
            "model": args.model,
            "label_names": names,
            "versions": versions,
            "epochs": [],
        }
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
            digest = order_digest(list(sampler))
            model.train()
            start = time.perf_counter()
            loss_sum = seen = 0.0
            for batch in train_loader:
                images, labels = to_device(batch, device, IMAGENET_MEAN, IMAGENET_STD)
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * labels.numel()
                seen += labels.numel()
            loss_sum, seen = all_sum([loss_sum, seen], device)
            seconds = time.perf_counter() - start
            correct, val_seen = evaluate(model, val_loader, device)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "train_samples_seen": int(seen),
                "val_samples_seen": val_seen,
                "val_accuracy": correct / max(val_seen, 1),
                "images_per_s": seen / seconds,
                "seconds": seconds,
                "order_digest": digest,
            }
            metrics["epochs"].append(row)
            log(
                f"epoch {epoch}: loss {row['train_loss']:.4f}, val acc {row['val_accuracy']:.2%} "
                f"({val_seen} samples), {row['images_per_s']:,.0f} img/s",
                flush=True,
            )
            if rank == 0 and args.metrics_out:
                write_json(args.metrics_out, metrics)
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
