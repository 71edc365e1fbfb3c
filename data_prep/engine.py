"""The write of a conversion: check every image, write the rows as Lance data files, then one commit.

Images are checked (``data_prep.check``: PIL open + verify + a decode at reduced scale) before they are
written, in parallel: on this machine (``engine="local"``: ``data_prep.pool``) or in Ray tasks
(``engine="ray"``: ``data_prep.ray_engine``). Rows are streamed into Lance batch by batch (at most
``batch_rows`` rows and ``batch_bytes`` of images each), so memory stays flat however large the source or its
images are, and become a dataset in one atomic commit (``data_prep.write``): a failed or interrupted run
leaves the previous version readable and nothing partial at the output.

Lance, tqdm and Ray are imported where they are used: the checking workers of ``data_prep.pool`` import the
command's module (``data_prep.convert``, and so this one) again, and Lance (~0.5 s) or tqdm (its
importlib.metadata: ~45 ms) would delay every worker's start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .check import ParameterError
from .pool import checked_batches
from .result import Written
from .sources import Source, printable

if TYPE_CHECKING:
    from lance import LanceDataset

    from .write import Destination

__all__ = ["Settings", "write_and_commit"]


@dataclass(frozen=True)
class Settings:
    """How a conversion checks and writes.

    The fields are the parameters of :func:`data_prep.convert.convert` of the same names.

    Raises
    ------
    ParameterError
        For a count below 1 or an unknown engine, naming the parameter and its command-line flag.
    """

    max_rows: int | None
    rows_per_file: int
    batch_rows: int
    batch_bytes: int
    workers: int | None
    max_image_pixels: int | None
    engine: str
    skip_invalid: bool
    ray_connect_timeout_s: float

    def __post_init__(self) -> None:
        for name in ("max_rows", "rows_per_file", "batch_rows", "batch_bytes", "workers", "max_image_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ParameterError(f"{{name}} must be at least 1, got {value}", name, flag)
        if self.engine not in ("local", "ray"):
            message = f"unknown {{name}} {self.engine!r} (choose local or ray)"
            raise ParameterError(message, "engine", "--engine")


def write_and_commit(
    src: Source, dest: Destination, settings: Settings, progress: bool
) -> tuple[Written, LanceDataset]:
    """Write ``src`` at ``dest`` as one new version, under a progress bar unless ``progress`` is False.

    Returns
    -------
    (Written, LanceDataset)
        What was written, and the dataset as committed (read back).

    Raises
    ------
    ConversionError
        Naming what failed (an object store's refusal: one line naming the URI). On any failure, an
        interruption included, the uncommitted data files are deleted first
        (:meth:`~data_prep.write.Destination.abandon`); what could not be is named in the exception's notes.
    """
    from .write import dataset_metadata

    with _undone_on_failure(dest):
        written = _write(src, dest, settings, progress)
        info = {
            "source": src.description,
            "skipped": written.skipped,
            "unlabelled": written.labels[-1],
            "warnings": src.warnings,
        }
        ds = dest.commit(written.fragments, dataset_metadata(src.label_names, info), written.rows)
    return written, ds


@contextmanager
def _undone_on_failure(dest: Destination) -> Iterator[None]:
    """Abandon ``dest``'s uncommitted write on any exception, noting what could not be deleted.

    It does so even after a second Ctrl-C: this runs before the exception leaves. An object store's refusal
    becomes one line naming the URI (:func:`data_prep.write.store_error`).
    """
    from .write import store_error

    try:
        yield
    except BaseException as e:
        left = dest.abandon()
        if left:
            e.add_note(
                f"{len(left)} file(s) this run wrote under {dest.uri} could not be deleted: "
                + ", ".join(left[:3])
                + (" ..." if len(left) > 3 else "")
                + " (delete them with your store's tools; no version refers to them)"
            )
        refused = store_error(dest.uri, e, "write")
        if refused is not None:
            refused.__notes__ = getattr(e, "__notes__", [])
            raise refused from None
        raise


def _write(src: Source, dest: Destination, settings: Settings, progress: bool) -> Written:
    """Check ``src``'s records and write them as data files at ``dest`` on ``settings.engine``.

    Returns what was written, uncommitted.
    """
    from tqdm import tqdm

    description = printable(src.description)  # a terminal line: hf:NAME or a folder's name can hold anything
    with tqdm(total=src.total, unit="img", desc=f"converting {description}", disable=not progress) as bar:
        dest.prepare()
        if settings.engine == "local":
            return _write_local(src, dest, settings, bar)
        from .ray_engine import write_fragments_ray

        return write_fragments_ray(
            src.records,
            dest.target,
            mode=dest.mode,
            rows_per_file=settings.rows_per_file,
            storage_options=dest.storage_options,
            block_rows=settings.batch_rows,
            block_bytes=settings.batch_bytes,
            max_rows=settings.max_rows,
            skip_invalid=settings.skip_invalid,
            progress=bar,
            description=src.description,
            connect_timeout_s=settings.ray_connect_timeout_s,
        )


def _write_local(src: Source, dest: Destination, settings: Settings, bar) -> Written:
    """Check ``src``'s records on this machine and stream them into data files at ``dest``.

    On failure, the checking pool is stopped before this returns.
    """
    from .write import record_batches, write_stream

    total, max_rows = src.total, settings.max_rows
    expected = total if max_rows is None or total is None else min(total, max_rows)
    checked, pool = checked_batches(
        src.records,
        batch_rows=settings.batch_rows,
        batch_bytes=settings.batch_bytes,
        workers=settings.workers,
        expected=expected,
    )
    written = Written()
    batches = record_batches(checked, written, max_rows, settings.skip_invalid, bar, src.description)
    try:
        written.fragments = write_stream(
            batches,
            dest.target,
            mode=dest.mode,
            rows_per_file=settings.rows_per_file,
            storage_options=dest.storage_options,
            generators=[batches, checked],
            # a reader thread waiting for a check gets CancelledError and leaves
            on_failure=pool.close if pool is not None else lambda: None,
        )
        return written
    finally:
        if pool is not None:
            pool.close()
