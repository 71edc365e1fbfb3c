"""Time the recipe's read-ahead: images/s from local disk and from a real S3 server at 0, 10 and 50 ms.

One process, one dataset (``count`` distinct 32x32 JPEGs from :mod:`.synthetic`, converted by
``data_prep.convert`` to a local path and to SeaweedFS behind Envoy, :mod:`.s3_servers`), the recipe's
loader (``make_loader``: 2 forkserver workers, batch 64, ``ImageCollate(32, decoder="torchvision",
dtype=torch.uint8)``), in random order (``RandomSampler``) and in block order (``BlockShuffleSampler``).
For each order and store, the variants alternate in ``rounds`` rounds; each loader's first epoch (worker
start-up) is not timed, then ``epochs`` epochs are; a variant's figure is its best epoch. A variant is
``off`` (no read-ahead), ``D`` (``read_ahead=D``: batches of ``D // 2`` to a ``take``, as ``make_loader``
does) or ``DxP`` (``P`` batches to a ``take``; ``8x1``: one ``take`` a batch, 8 threads).

``python -m lance_cookbook.bench.readahead --out readahead.jsonl`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import RandomSampler

from ..recipe.block_sampler import BlockShuffleSampler
from ..recipe.collate import ImageCollate
from ..recipe.dataset import LanceImageDataset, open_dataset
from ..recipe.loader import make_loader
from ..recipe.readahead import ReadAhead

__all__ = ["PerReadDataset", "build_parser", "main", "measure"]


class PerReadDataset(LanceImageDataset):
    """``LanceImageDataset`` whose read-ahead reads ``per_read`` batches to a ``take`` (a variant to time)."""

    def __init__(self, dataset: LanceImageDataset, per_read: int):
        self.__dict__.update(vars(dataset))
        self.per_read = per_read

    def __getitems__(self, indices):
        if self._read_ahead is None and self._ds is not None:
            self._read_ahead = ReadAhead(self._read, per_read=self.per_read)
        return super().__getitems__(indices)


def _variant(name: str) -> tuple[int, int | None]:
    if name == "off":
        return 0, None
    depth, _, per_read = name.partition("x")
    return int(depth), int(per_read) if per_read else None


def measure(
    uri: str,
    options: dict[str, str] | None,
    order: str,
    variants: list[str],
    *,
    rounds: int,
    epochs: int,
    workers: int = 2,
    batch_size: int = 64,
    requests: Any = None,
    samples: int | None = None,
) -> dict[str, dict[str, float]]:
    """Return ``{variant: {"images_per_s", "requests_per_image"}}`` for one store and order, best epoch.

    ``samples``: rows a random epoch reads (default all): a few rows of a large dataset are scattered.
    """
    base = open_dataset(uri, storage_options=options, columns=("image", "label"))
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name in variants:
            depth, per_read = _variant(name)
            dataset = base if per_read is None else PerReadDataset(base, per_read)
            if order == "block":
                sampler: Any = BlockShuffleSampler(dataset, num_replicas=1, rank=0, seed=0)
            else:
                generator = torch.Generator().manual_seed(0)
                sampler = RandomSampler(dataset, num_samples=samples, generator=generator)
            loader = make_loader(
                dataset,
                batch_size=batch_size,
                num_workers=workers,
                sampler=sampler,
                collate_fn=ImageCollate(32, decoder="torchvision", dtype=torch.uint8),
                read_ahead=depth,
            )
            for epoch in range(epochs + 1):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                before = requests() if requests else 0
                start = time.perf_counter()
                images = sum(len(labels) for _, labels in loader)
                rate = images / (time.perf_counter() - start)
                per_image = ((requests() - before) / images) if requests else 0.0
                if epoch and rate > best.get(name, {}).get("images_per_s", 0.0):
                    best[name] = {"images_per_s": rate, "requests_per_image": per_image}
            del loader
    return best


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser."""
    parser = argparse.ArgumentParser(prog="python -m lance_cookbook.bench.readahead", description=__doc__)
    parser.add_argument("--count", type=int, default=4000, help="distinct 32x32 JPEGs (default 4000)")
    parser.add_argument("--variants", default="off,8", help="comma-separated: off, D or DxP (default off,8)")
    parser.add_argument("--delays", default="0,10,50", help="ms per request at the server (default 0,10,50)")
    parser.add_argument("--orders", default="random,block", help="random and/or block (default both)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternated variants (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader (default 2)")
    parser.add_argument("--samples", type=int, help="random order: rows read per epoch (default all)")
    parser.add_argument("--no-local", action="store_true", help="skip local disk")
    parser.add_argument("--out", type=Path, help="append one JSON line per figure here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate, convert, upload, then time every order x store x variant; print a table."""
    from data_prep.convert import convert

    from .s3_formats import Store, upload
    from .s3_servers import s3_servers
    from .synthetic import generate_imagefolder

    args = build_parser().parse_args(argv)
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="readahead-") as tmp, s3_servers("bench") as servers:
        folder = Path(tmp) / "img32"
        generate_imagefolder(folder, args.count, "32x32", classes=10, seed=0, workers=2)
        local, remote = str(Path(tmp) / "local.lance"), f"s3://{servers.bucket}/img32.lance"
        convert(f"imagefolder:{folder}", local, progress=False)
        # Lance writes the same files to s3:// as to a path: upload them (boto3 retries what weed refuses
        # under load; a convert to s3:// does not)
        upload(Store(servers.direct_options, servers.bucket), local, "img32.lance")
        stores: list[tuple[str, str, Any, float | None]] = (
            [] if args.no_local else [("local", local, None, None)]
        )
        stores += [
            (f"s3 {ms} ms", remote, servers.storage_options, float(ms)) for ms in args.delays.split(",")
        ]
        for order in args.orders.split(","):
            for store, uri, options, delay in stores:
                if delay is not None:
                    servers.set_delay(delay)
                counter = servers.requests if options else None
                best = measure(
                    uri,
                    options,
                    order,
                    variants,
                    rounds=args.rounds,
                    epochs=args.epochs,
                    requests=counter,
                    samples=args.samples,
                )
                for name, figures in best.items():
                    row = {"order": order, "store": store, "variant": name, **figures}
                    print(f"{order:7} {store:10} {name:6} {figures['images_per_s']:8.0f} img/s "
                          f"{figures['requests_per_image']:.3f} req/img", flush=True)  # fmt: skip
                    if args.out:
                        with open(args.out, "a") as out:
                            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
