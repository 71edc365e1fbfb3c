"""``convert()`` and its command line: an image dataset into Lance, keeping each image's encoded bytes.

    python -m data_prep.convert --source SOURCE --output URI [--split NAME] [--overwrite]
                                [--max-rows N] [--rows-per-file N] [--skip-invalid]
                                [--engine local|ray] [--storage-option KEY=VALUE ...] [--shuffle SEED]

SOURCE: ``digits``, ``imagefolder:DIR`` or ``hf:NAME`` (``data_prep.sources``). Every input problem ends in
one line naming the file or row (exit 2, nothing written), or with --skip-invalid in a list of what was
skipped.

Every image is checked (``data_prep.check``: PIL open + verify + a decode at reduced scale) before it is
written, in parallel (``data_prep.pool``, or Ray tasks with ``--engine ray``: ``data_prep.ray_engine``).
Rows are streamed into Lance batch by batch (at most ``--batch-rows`` rows and ``--batch-mib`` MiB of images
each), so memory stays flat however large the source or its images are, and become a dataset in one atomic
commit (``data_prep.write``): a failed or interrupted run leaves the previous version
readable and nothing partial at ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from data_prep.disk_usage import dir_bytes

# Torch-free helpers: lance_cookbook exports lazily, so these load neither torch nor Lance (the spawn workers
# import this module again; tests/test_convert_imports.py checks both)
from lance_cookbook.cli import add_storage_option_argument

from .check import ConversionError, InvalidImage, ParameterError, image_pixel_limit
from .pool import BATCH_BYTES, checked_batches
from .sources import IMAGE_EXTENSIONS, Source, digits_source, open_source, printable, shuffled

if TYPE_CHECKING:  # for type checkers and linters; at run time __getattr__ imports it (it loads Lance)
    from .write import SCHEMA

__all__ = [
    "Summary",
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


@dataclass
class Summary:
    """What a conversion wrote: ``rows`` and ``classes`` at ``output`` (dataset ``version``), the bytes of
    the images and (local output) on disk, and ``seconds`` it took; ``skipped`` lists invalid images passed
    over, ``unlabelled`` counts rows with label -1, ``warnings`` the source's notes (links not followed)."""

    output: str
    rows: int
    classes: int
    image_bytes: int
    disk_bytes: int | None
    seconds: float
    version: int
    skipped: list[str]
    unlabelled: int = 0  # rows with label -1 (no label in the source, e.g. a hub test split)
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        """The summary as printed: names of files, the output and the source's notes shown with
        :func:`~data_prep.sources.printable`, so no control character reaches the terminal (bat#3691)."""
        disk = f", {self.disk_bytes / 1e6:,.1f} MB on disk" if self.disk_bytes is not None else ""
        line = (
            f"wrote {printable(self.output)} (version {self.version}): {self.rows:,} rows, "
            f"{self.classes} classes, "
            f"{self.image_bytes / 1e6:,.1f} MB of image bytes{disk}, {self.seconds:.1f} s "
            f"({self.images_per_s:,.0f} images/s)"
        )
        if self.unlabelled:
            some = "all" if self.unlabelled == self.rows else f"{self.unlabelled:,} of"
            line += f"\nunlabelled: {some} {self.rows:,} rows have label -1 (the source gives no label)"
        if self.skipped:
            skipped = "\n  ".join(map(printable, self.skipped))
            line += f"\nskipped {len(self.skipped)} invalid image(s):\n  {skipped}"
        if self.warnings:
            line += "\nnote:\n  " + "\n  ".join(map(printable, self.warnings))
        return line


def __getattr__(name: str):
    """Names that lived in this module before the conversion was split into modules, for notebooks and
    scripts written against it (``IMAGE_EXTENSIONS`` and ``digits_source`` are imported above). ``SCHEMA``
    is looked up on use: importing ``data_prep.write`` here would load Lance into every checking worker."""
    if name == "SCHEMA":
        from .write import SCHEMA

        return SCHEMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_parameters(**values) -> None:
    """Refuse a count below 1, naming the parameter (and, for the command line, its flag)."""
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ParameterError(f"{{name}} must be at least 1, got {value}", name, flag)


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
    """Convert ``source`` (a spec string or a :class:`~data_prep.sources.Source`) into a Lance dataset at
    ``output``.

    Parameters
    ----------
    source : str or Source
        ``digits``, ``imagefolder:DIR`` or ``hf:NAME`` (``data_prep.sources``), or a Source.
    output : str or path
        Local path or object-store URI (``s3://bucket/x.lance``) of the dataset.
    split, image_column, label_column : str, optional
        Passed to the source (see ``data_prep.sources.open_source``).
    overwrite : bool
        Replace an existing dataset by a new version (the previous one stays readable).
    max_rows : int, optional
        Stop after this many valid rows, in source order (in the ``shuffle`` order when given: a random
        subset).
    rows_per_file : int
        Most rows per Lance data file.
    skip_invalid : bool
        List invalid images in the Summary and the metadata instead of stopping at the first.
    storage_options : dict of str, optional
        Lance's object-store options (``docs/scale.md``).
    batch_rows : int
        Most rows per record batch streamed to Lance (per Ray task with ``engine="ray"``).
    batch_bytes : int
        Most bytes of images per batch (default 32 MiB; a larger image makes a batch alone). A batch is
        held in memory while it is checked and turned into Arrow, so this, not ``batch_rows``, bounds
        memory for large photos (datasets#741, the t3-conv-large-images-memory report).
    workers : int, optional
        Checks at once (default: the usable CPUs); worker processes for large sources (``data_prep.pool``).
    progress : bool
        Show a progress bar.
    engine : {"local", "ray"}
        Where images are checked and written: this machine, or a Ray cluster (``RAY_ADDRESS``, else a
        local Ray).
    ray_connect_timeout_s : float
        Seconds to wait for the cluster named by ``RAY_ADDRESS`` to answer before giving up.
    shuffle : int, optional
        Write the rows in a random order drawn from this seed (default: source order).
        The source's records are taken in the order ``data_prep.sources.permutation(total, shuffle)``
        (``numpy.random.default_rng(shuffle).permutation(total)`` of the source positions, invalid
        records included), so the same seed gives the same dataset. Only positions are shuffled: memory
        stays flat. ``id`` is the row's position in the dataset, as without shuffling; ``source`` names
        the file or row it came from. With ``max_rows``, the first valid rows of the shuffled order: a
        random subset.
    max_image_pixels : int, optional
        Largest image accepted, in pixels (width x height); larger ones are invalid ("decompression
        bomb"). Default: ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 unless changed). A 100-MP camera photo
        needs more (TagStudio#164, the t3-conv-100mp-photo-refused report). Sets
        ``PIL.Image.MAX_IMAGE_PIXELS`` for the duration of the call
        (:func:`data_prep.check.image_pixel_limit`): the checks on this machine, in worker processes and in
        Ray tasks all follow it.

    Returns
    -------
    Summary
        Rows (read back from the committed dataset), classes, bytes, seconds; rows with label -1
        (``unlabelled``) and the source's ``warnings`` (links not followed), both also in the metadata.

    Raises
    ------
    ConversionError
        A message naming the file, row, path, URI or parameter at fault (:class:`InvalidImage` for an
        image, :class:`ParameterError` for a parameter). On any failure, interruption included, nothing is
        left at a new ``output`` (nor the folders made for it, nor data files on object storage), an
        existing dataset keeps its previous version as the latest, and no worker process or thread of ours
        is running. What could not be deleted is named in the exception's notes.
    """
    _check_parameters(
        max_rows=max_rows,
        rows_per_file=rows_per_file,
        batch_rows=batch_rows,
        batch_bytes=batch_bytes,
        workers=workers,
        max_image_pixels=max_image_pixels,
    )
    if engine not in ("local", "ray"):
        raise ParameterError(f"unknown {{name}} {engine!r} (choose local or ray)", "engine", "--engine")
    # Imported here: the checking workers of data_prep.pool import the command's module (this one, under
    # `python -m data_prep.convert`) again, and Lance (~0.5 s) or tqdm (its importlib.metadata: ~45 ms)
    # would delay every worker's start.
    from tqdm import tqdm

    from .write import Destination, dataset_metadata, store_error

    uri = str(output)
    dest = Destination(uri, overwrite=overwrite, storage_options=storage_options)
    src = source if isinstance(source, Source) else open_source(source, split, image_column, label_column)
    if shuffle is not None:
        src = shuffled(src, shuffle)
    skipped: list[str] = []
    stats = {"image_bytes": 0, "labels": Counter()}  # rows per label
    start = time.perf_counter()
    description = printable(src.description)  # a terminal line: hf:NAME or a folder's name can hold anything
    bar = tqdm(total=src.total, unit="img", desc=f"converting {description}", disable=not progress)
    # PIL's pixel limit, for the checks here and in every worker (copied from this process's PIL)
    with image_pixel_limit(max_image_pixels):
        try:
            dest.prepare()
            if engine == "ray":
                from .ray_engine import write_fragments_ray

                fragments = write_fragments_ray(
                    src.records,
                    dest.target,
                    mode=dest.mode,
                    rows_per_file=rows_per_file,
                    storage_options=storage_options,
                    block_rows=batch_rows,
                    block_bytes=batch_bytes,
                    max_rows=max_rows,
                    skip_invalid=skip_invalid,
                    skipped=skipped,
                    stats=stats,
                    progress=bar,
                    description=src.description,
                    connect_timeout_s=ray_connect_timeout_s,
                )
            else:
                batches = (batch_rows, batch_bytes)
                fragments = _write_local(
                    src, dest, max_rows, rows_per_file, skip_invalid, workers, batches, skipped, stats, bar
                )
            info = {
                "source": src.description,
                "skipped": skipped,
                "unlabelled": stats["labels"][-1],
                "warnings": src.warnings,
            }
            ds = dest.commit(
                fragments, dataset_metadata(src.label_names, info), sum(stats["labels"].values())
            )
            seconds = time.perf_counter() - start
        except BaseException as e:
            left = dest.abandon()  # even after a second Ctrl-C: runs before the exception leaves
            if left:
                e.add_note(
                    f"{len(left)} file(s) this run wrote under {uri} could not be deleted: "
                    + ", ".join(left[:3])
                    + (" ..." if len(left) > 3 else "")
                    + " (delete them with your store's tools; no version refers to them)"
                )
            refused = store_error(uri, e, "write")
            if refused is not None:
                refused.__notes__ = getattr(e, "__notes__", [])
                raise refused from None
            raise
        finally:
            bar.close()
    return Summary(
        output=uri,
        rows=ds.count_rows(),
        classes=len(src.label_names) or sum(1 for label in stats["labels"] if label >= 0),
        image_bytes=stats["image_bytes"],
        disk_bytes=None if dest.remote else dir_bytes(uri)[0],
        seconds=seconds,
        version=ds.version,
        skipped=skipped,
        unlabelled=stats["labels"][-1],
        warnings=src.warnings,
    )


def _write_local(src, dest, max_rows, rows_per_file, skip_invalid, workers, batches, skipped, stats, bar):
    """Check ``src``'s records on this machine and write them as data files at ``dest``; return the
    fragments, uncommitted. On failure, the checking pool is stopped before this returns."""
    from .write import record_batches, write_stream

    expected = src.total if max_rows is None or src.total is None else min(src.total, max_rows)
    batch_rows, batch_bytes = batches
    checked, pool = checked_batches(
        src.records, batch_rows=batch_rows, batch_bytes=batch_bytes, workers=workers, expected=expected
    )
    batches = record_batches(checked, max_rows, skip_invalid, skipped, stats, bar, src.description)
    try:
        return write_stream(
            batches,
            dest.target,
            mode=dest.mode,
            rows_per_file=rows_per_file,
            storage_options=dest.storage_options,
            generators=[batches, checked],
            # a reader thread waiting for a check gets CancelledError and leaves
            on_failure=pool.close if pool is not None else lambda: None,
        )
    finally:
        if pool is not None:
            pool.close()


def build_parser() -> argparse.ArgumentParser:
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
