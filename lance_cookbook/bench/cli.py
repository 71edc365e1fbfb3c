"""The benchmark's command line: ``python -m lance_cookbook.bench`` options, checks, and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..recipe.loader import default_workers
from .cache import CAN_EVICT
from .candidates import ALL_LOADERS, LOADERS, OPT_IN_LOADERS
from .lancedb_loaders import LANCEDB_LOADERS
from .peers import PEER_LOADERS
from .report import format_table, plot
from .runner import run

__all__ = ["build_parser", "main"]


def _loader_list(text: str) -> list[str]:
    if text in ("all", ""):
        return list(LOADERS)
    if text == "none":
        return []
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if "peers" in keys:  # shorthand for the three peers (they need the peer environment)
        keys = [k for k in keys if k != "peers"] + [k for k in PEER_LOADERS if k not in keys]
    if "lancedb" in keys:  # shorthand for LanceDB's four loaders (they need the `lancedb` extra)
        keys = [k for k in keys if k != "lancedb"] + [k for k in LANCEDB_LOADERS if k not in keys]
    unknown = [k for k in keys if k not in ALL_LOADERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(ALL_LOADERS)}, peers or lancedb"
        )
    return keys


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lance_cookbook.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m lance_cookbook.bench",
        description="Images/s of PyTorch loaders over the same images: image folder vs HF datasets vs Lance.",
        epilog="loaders: "
        + "; ".join(f"{k} = {v}" for k, v in LOADERS.items())
        + ". Peers (not in 'all'; 'peers' names the three; they need the 'bench' extra "
        + "in an environment of its own, .venv-bench of 'make bench'; see docs/benchmark.md): "
        + "; ".join(f"{k} = {v}" for k, v in PEER_LOADERS.items())
        + ". Opt-in (not in 'all'; name them in --loaders; 'lancedb' names LanceDB's four, which need the "
        + "'lancedb' extra): "
        + "; ".join(f"{k} = {v}" for k, v in OPT_IN_LOADERS.items()),
    )
    p.add_argument("--imagefolder", required=True, metavar="DIR", help="images as DIR/<class>/<image>")
    p.add_argument(
        "--lance",
        metavar="URI",
        help="Lance dataset of DIR: used as is if it exists (no conversion measured), else DIR is converted "
        "into it and kept (default: a temporary dataset)",
    )
    p.add_argument(
        "--shuffle",
        type=int,
        metavar="SEED",
        help="convert with the rows in the random order of SEED (data_prep.convert --shuffle), as the block "
        "sampler (lance_tv_uint8_block) needs for batches of mixed classes; default: ImageFolder order",
    )
    p.add_argument("--image-size", type=int, default=224, metavar="S", help="output height and width (224)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (64)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="DataLoader workers (default: one per core, <= 8)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="E",
        help="epochs per loader: one warm-up, then E-1 timed rounds interleaved across the loaders "
        "(4; --quick: 2)",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart of images/s to FILE (PNG)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, short decode-bound loops")
    p.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="first write N synthetic JPEGs into DIR (lance_cookbook.bench.synthetic), unless DIR has files",
    )
    p.add_argument(
        "--generate-size", default="500x375", metavar="WxH", help="size of the --generate images (500x375)"
    )
    p.add_argument("--classes", type=int, default=10, metavar="K", help="class folders for --generate (10)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of --generate and of the shared shuffled order (0)"
    )
    p.add_argument(
        "--loaders",
        type=_loader_list,
        default=list(LOADERS),
        metavar="LIST",
        help="comma-separated loader keys to run (default all core loaders; 'peers' adds WebDataset, "
        "Streaming and LitData; 'lancedb' LanceDB's StreamingDataset and Permutation loaders; 'none' "
        "measures conversion and storage only)",
    )
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="keep the converted dataset and the HF cache here (default: a temporary folder, removed)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each step of a worker of (g) (lance_tv_uint8) in this process (CPU us per image: "
        "Lance take, file reads, decode, resize, stacking, shared memory, pickling): where the time goes",
    )
    p.add_argument(
        "--cache",
        choices=("warm", "cold", "both"),
        default="warm",
        help="page cache before each timed epoch: warm (as left by the previous epoch), cold (every file "
        "of that loader's data evicted with posix_fadvise: a dataset larger than memory), or both, side by "
        "side (warm)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with the command line ``argv``; print the table.

    Returns the exit status (2: bad arguments).
    """
    args = build_parser().parse_args(argv)
    if args.workers is None:
        args.workers = default_workers()
    if args.epochs is None:
        args.epochs = 2 if args.quick else 4
    if args.epochs < 2:
        print("error: --epochs must be at least 2 (one warm-up, one timed)", file=sys.stderr)
        return 2
    if args.cache != "warm" and not CAN_EVICT:
        print("error: --cache cold needs os.posix_fadvise (Linux)", file=sys.stderr)
        return 2
    if not args.generate and not Path(args.imagefolder).is_dir():
        print(f"error: {args.imagefolder} is not a folder (pass --generate N to make one)", file=sys.stderr)
        return 2
    report = run(args)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.plot and report.get("loaders"):
        plot(report, args.plot)
    return 0
