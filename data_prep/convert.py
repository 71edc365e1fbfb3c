"""``convert()`` and its command line: an image dataset into Lance, keeping each image's encoded bytes.

    python -m data_prep.convert --source SOURCE --output URI [--split NAME] [--overwrite]
                                [--max-rows N] [--rows-per-file N] [--skip-invalid]
                                [--engine local|ray] [--storage-option KEY=VALUE ...] [--shuffle SEED]

SOURCE: ``digits``, ``imagefolder:DIR`` or ``hf:NAME`` (``data_prep.sources``). Every input problem ends in
one line naming the file or row (exit 2, nothing written), or with --skip-invalid in a list of what was
skipped.

Every image is checked before it is written, in parallel on this machine or on Ray, and the rows become a
dataset in one atomic commit: a failed or interrupted run leaves the previous version readable and nothing
partial at ``--output`` (``data_prep.engine``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

from PIL import Image

from data_prep.disk_usage import dir_bytes

# Torch-free helpers: lance_cookbook exports lazily, so these load neither torch nor Lance (the spawn workers
# import this module again; tests/test_convert_imports.py checks both)
from lance_cookbook.cli import add_storage_option_argument

from .check import ConversionError, InvalidImage, ParameterError, image_pixel_limit
from .engine import Settings, write_and_commit
from .pool import BATCH_BYTES
from .result import Summary, Written
from .sources import IMAGE_EXTENSIONS, Source, digits_source, open_source, printable, shuffled

if TYPE_CHECKING:  # for type checkers and linters; at run time __getattr__ imports SCHEMA (it loads Lance)
    from lance import LanceDataset

    from .write import SCHEMA, Destination

__all__ = [
    "build_parser",
    "convert",
    "main",
    # Re-exported from data_prep.sources / data_prep.write for notebook 01 and scripts written before the
    # conversion was split into modules; new code imports them from there
    "IMAGE_EXTENSIONS",
    "SCHEMA",  # looked up on use: see __getattr__
    "digits_source",
]

RAY_CONNECT_TIMEOUT_S = 60.0  # default wait for a Ray cluster named by RAY_ADDRESS to answer


def __getattr__(name: str):
    """Names that lived in this module before the conversion was split into modules.

    For notebooks and scripts written against it (``IMAGE_EXTENSIONS`` and ``digits_source`` are imported
    above). ``SCHEMA`` is looked up on use: importing ``data_prep.write`` here would load Lance into every
    checking worker.
    """
    if name == "SCHEMA":
        from .write import SCHEMA

        return SCHEMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def convert(
    source: str | Source,
    output: str | os.PathLike,
    *,
    split: str | None = None,
    overwrite: bool = False,
    max_rows: int | None = None,
    rows_per_file: int = 1024 * 1024,
    skip_invalid: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    storage_options: dict[str, str] | None = None,
    batch_rows: int = 512,
    batch_bytes: int = BATCH_BYTES,
    workers: int | None = None,
    progress: bool = True,
    engine: str = "local",
    ray_connect_timeout_s: float = RAY_CONNECT_TIMEOUT_S,
    shuffle: int | None = None,
    max_image_pixels: int | None = None,
) -> Summary:
    """Convert ``source`` into a Lance dataset at ``output`` in one commit, checking every image first.

    Parameters
    ----------
    source : str or Source
        ``digits``, ``imagefolder:DIR`` or ``hf:NAME``, opened with ``split``, ``image_column`` and
        ``label_column`` (:func:`~data_prep.sources.open_source`), or a :class:`~data_prep.sources.Source`.
    output : str or path
        Local path or object-store URI (``s3://bucket/x.lance``; ``storage_options``: ``docs/scale.md``).
    overwrite, skip_invalid : bool
        Replace an existing dataset by a new version (the previous one stays readable); list invalid images
        in the Summary and the metadata instead of stopping at the first.
    max_rows, rows_per_file : int
        Stop after ``max_rows`` valid rows (a random subset with ``shuffle``); most rows per data file.
    batch_rows, batch_bytes, workers : int
        Most rows and image bytes per batch streamed to Lance or per Ray task (``batch_bytes`` bounds memory
        for large photos: datasets#741); checks at once (default: the usable CPUs, ``data_prep.pool``).
    progress : bool
        Show a progress bar.
    engine : {"local", "ray"}
        Check and write on this machine, or on Ray (``RAY_ADDRESS``, answering within
        ``ray_connect_timeout_s`` seconds; else a local Ray).
    shuffle : int, optional
        Seed of the row order, ``data_prep.sources.permutation(total, shuffle)`` of the source positions: the
        same seed, the same dataset; ``id`` still numbers the rows as written.
    max_image_pixels : int, optional
        Largest image accepted (a larger one is a "decompression bomb"), here, in workers and in Ray tasks
        (default ``PIL.Image.MAX_IMAGE_PIXELS``; a 100-MP camera photo needs more: TagStudio#164).

    Returns
    -------
    Summary
        Rows read back from the commit, classes, bytes, seconds, skipped and unlabelled rows, warnings.

    Raises
    ------
    ConversionError
        Naming the file, row, URI or parameter at fault (:class:`InvalidImage`, :class:`ParameterError`). On
        any failure, interruption included, nothing new is left at ``output``, the previous version stays the
        latest and no worker of ours runs; what could not be deleted is in the exception's notes.
    """
    settings = Settings(
        max_rows=max_rows,
        rows_per_file=rows_per_file,
        batch_rows=batch_rows,
        batch_bytes=batch_bytes,
        workers=workers,
        max_image_pixels=max_image_pixels,
        engine=engine,
        skip_invalid=skip_invalid,
        ray_connect_timeout_s=ray_connect_timeout_s,
    )
    src, dest = _open(source, output, split, image_column, label_column, shuffle, overwrite, storage_options)
    start = time.perf_counter()
    with image_pixel_limit(max_image_pixels):  # copied from this process's PIL into every worker
        written, ds = write_and_commit(src, dest, settings, progress)
    return _summary(src, dest, written, ds, time.perf_counter() - start)


def _open(
    source: str | Source,
    output: str | os.PathLike,
    split: str | None,
    image_column: str | None,
    label_column: str | None,
    shuffle: int | None,
    overwrite: bool,
    storage_options: dict[str, str] | None,
) -> tuple[Source, Destination]:
    """The source of :func:`convert` and its destination, checked first.

    The source is shuffled when ``shuffle`` is a seed.
    """
    from .write import Destination  # here, not above: it loads Lance (see data_prep.engine)

    dest = Destination(str(output), overwrite=overwrite, storage_options=storage_options)
    src = source if isinstance(source, Source) else open_source(source, split, image_column, label_column)
    return (src if shuffle is None else shuffled(src, shuffle)), dest


def _summary(src: Source, dest: Destination, written: Written, ds: LanceDataset, seconds: float) -> Summary:
    """What :func:`convert` wrote: ``ds``, as committed, and the counts of ``written``."""
    return Summary(
        output=dest.uri,
        rows=ds.count_rows(),
        classes=len(src.label_names) or sum(1 for label in written.labels if label >= 0),
        image_bytes=written.image_bytes,
        disk_bytes=None if dest.remote else dir_bytes(dest.uri)[0],
        seconds=seconds,
        version=ds.version,
        skipped=written.skipped,
        unlabelled=written.labels[-1],
        warnings=src.warnings,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser (``python -m data_prep.convert``), used by :func:`main`."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep.convert",
        description="Convert an image dataset into Lance, keeping each image's original encoded bytes.",
    )
    p.add_argument(
        "--source",
        required=True,
        help="digits | imagefolder:DIR | hf:NAME (hub name or local folder); relative paths are resolved "
        "here (required)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="destination Lance URI: a local path (resolved here) or s3://bucket/path.lance (required)",
    )
    p.add_argument(
        "--split",
        help="split to convert (hf: train/validation/test...; digits: train/test/all) (default: train)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset as a new version (default: refuse)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        metavar="N",
        help="stop after N valid rows, in source order or in the --shuffle order when given (default: all)",
    )
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=1024 * 1024,
        metavar="N",
        help="most rows per Lance data file (default: 1048576)",
    )
    p.add_argument("--image-column", help="hf: image column (default: the first Image feature)")
    p.add_argument(
        "--label-column",
        help="hf: label column (default: the first ClassLabel feature, else a column named label)",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip images that fail their check, list them, and record them in the metadata (default: stop "
        "at the first, naming it)",
    )
    add_storage_option_argument(
        p, "object-store option passed to Lance, e.g. aws_region=us-east-1 (repeatable; default: none)"
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine, checking with worker processes (threads for small sources); ray: check "
        "and write in parallel on a Ray cluster (RAY_ADDRESS, else a local one), then one commit here "
        "(default: local)",
    )
    p.add_argument(
        "--ray-connect-timeout",
        type=float,
        default=RAY_CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help="with --engine ray: seconds to wait for the cluster named by RAY_ADDRESS to answer "
        f"(default: {RAY_CONNECT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="images checked at once (default: the usable CPUs, at most 8; worker processes for 2,000 "
        "images or more)",
    )
    p.add_argument(
        "--batch-rows",
        type=int,
        default=512,
        metavar="N",
        help="most rows per record batch streamed to Lance, or per Ray task (default: 512)",
    )
    p.add_argument(
        "--batch-mib",
        type=_positive_int,
        metavar="MIB",
        help="most MiB of images per batch; a batch is held in memory while it is checked and written, so "
        f"this bounds memory for large photos (default: {BATCH_BYTES >> 20})",
    )
    p.add_argument(
        "--shuffle",
        type=int,
        metavar="SEED",
        help="write the rows in a random order drawn from SEED (the same seed, the same order); the id "
        "column numbers rows as written, the source column names each row's file (default: source order)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="largest image accepted, in pixels (width x height); larger ones are refused as decompression "
        "bombs, or skipped with --skip-invalid. A 100-megapixel camera photo needs e.g. 120000000 "
        f"(default: PIL.Image.MAX_IMAGE_PIXELS, {Image.MAX_IMAGE_PIXELS:,})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.add_argument(
        "--summary-json",
        metavar="PATH",
        help="also write the summary (rows, seconds, bytes, skipped...) to PATH as JSON (default: none)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when written, 2 for a conversion error (one line on stderr), 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            # check_image raises its own, clearer error for oversized images
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            summary = convert(
                args.source,
                args.output,
                split=args.split,
                overwrite=args.overwrite,
                max_rows=args.max_rows,
                rows_per_file=args.rows_per_file,
                skip_invalid=args.skip_invalid,
                image_column=args.image_column,
                label_column=args.label_column,
                storage_options=dict(args.storage_option) or None,
                batch_rows=args.batch_rows,
                batch_bytes=BATCH_BYTES if args.batch_mib is None else args.batch_mib << 20,
                workers=args.workers,
                progress=not args.no_progress,
                engine=args.engine,
                ray_connect_timeout_s=args.ray_connect_timeout,
                shuffle=args.shuffle,
                max_image_pixels=args.max_image_pixels,
            )
    except ConversionError as e:
        message = e.cli_message if isinstance(e, ParameterError) else str(e)
        hint = ""
        if isinstance(e, InvalidImage):
            larger = "pass --max-image-pixels N to accept larger images, or " if _is_bomb(e) else "pass "
            hint = f" ({larger}--skip-invalid to skip such files)"
        # One line, whatever a file name, a library's message or an argument holds (bat#3691)
        print(printable(f"error: {message}{hint}; {_what_was_left(e, args.output)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(printable(f"interrupted; {_what_was_left(e, args.output)}"), file=sys.stderr)
        return 130
    if args.summary_json:
        fields = dataclasses.asdict(summary) | {"images_per_s": summary.images_per_s}
        tmp = f"{args.summary_json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(fields, f)
        os.replace(tmp, args.summary_json)  # a reader never sees half a file
    print(summary)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _is_bomb(error: InvalidImage) -> bool:
    return error.reason.startswith("decompression bomb")


def _what_was_left(error: BaseException, output: str) -> str:
    notes = getattr(error, "__notes__", [])
    return "; ".join(notes) if notes else f"nothing was written to {output}"


if __name__ == "__main__":
    sys.exit(main())
