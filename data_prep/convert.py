"""Convert an image dataset into Lance, keeping every image's original encoded bytes.

    python -m data_prep.convert --source SOURCE --output URI [--split NAME] [--overwrite]
                                [--max-rows N] [--rows-per-file N] [--skip-invalid]
                                [--engine local|ray] [--storage-option KEY=VALUE ...]

SOURCE is one of
  digits            the UCI handwritten digits bundled with scikit-learn, stored as PNG (offline default)
  imagefolder:DIR   DIR/<class>/<image>; class index = position in the sorted class folder names, rows in
                    torchvision ImageFolder's order; hidden entries and __MACOSX ignored, links followed
                    unless they loop or lead to something listed already (see imagefolder_source)
  hf:NAME           a Hugging Face dataset (hub name or a local folder laid out like a hub repository);
                    a missing label is stored as -1 (see hf_source)

Every input problem ends in one line naming the file or row (exit 2, nothing written), or with
--skip-invalid in a list of what was skipped.

Every image is checked (PIL open + verify + a decode at reduced scale) before it is written: by worker
processes for large sources (PIL's Python-level parsing holds the GIL, so threads barely scale), by threads
for small ones. Rows are streamed into Lance batch by batch, so memory stays flat however large the source
is.
A new local dataset is written beside its destination and renamed into place only when complete; an
existing dataset is replaced by one atomic commit, so a failed or interrupted run leaves its previous
version readable and nothing partial at ``--output``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path, PurePosixPath

import lance
import pyarrow as pa
from lance.fragment import write_fragments
from PIL import Image
from tqdm import tqdm

from .check import (  # check_image: part of this module's API
    ConversionError,
    InvalidImage,
    check_image,  # noqa: F401
    check_items,
    pil_settings,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
METADATA_KEY = b"lance_cookbook"
LABEL_NAMES_KEY = b"label_names"

SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)


@dataclass
class Record:
    """One source image: its encoded bytes (or the path to read them from), label and provenance."""

    source: str
    label: int
    data: bytes | None = None
    path: str | None = None
    problem: str | None = None  # set by a source that already knows the record is unusable


@dataclass
class Source:
    """A stream of records plus what is known about it before reading it."""

    records: Iterable[Record]
    label_names: list[str]
    description: str
    total: int | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. links not followed; shown with the summary


@dataclass
class Summary:
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
        disk = f", {self.disk_bytes / 1e6:,.1f} MB on disk" if self.disk_bytes is not None else ""
        line = (
            f"wrote {self.output} (version {self.version}): {self.rows:,} rows, {self.classes} classes, "
            f"{self.image_bytes / 1e6:,.1f} MB of image bytes{disk}, {self.seconds:.1f} s "
            f"({self.images_per_s:,.0f} images/s)"
        )
        if self.unlabelled:
            some = "all" if self.unlabelled == self.rows else f"{self.unlabelled:,} of"
            line += f"\nunlabelled: {some} {self.rows:,} rows have label -1 (the source gives no label)"
        if self.skipped:
            line += f"\nskipped {len(self.skipped)} invalid image(s):\n  " + "\n  ".join(self.skipped)
        if self.warnings:
            line += "\nnote:\n  " + "\n  ".join(self.warnings)
        return line


# ---------------------------------------------------------------------------------------------- sources
def digits_source(split: str | None = None) -> Source:
    """The UCI handwritten digits bundled with scikit-learn (1,797 8x8 images), each stored as a PNG.

    ``split``: ``train`` (80 %, the default), ``test`` (20 %, stratified, fixed seed) or ``all``.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    split = split or "train"
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target)
    chosen = {"train": np.sort(train), "test": np.sort(test), "all": index}.get(split)
    if chosen is None:
        raise ConversionError(f"digits: unknown split {split!r} (choose train, test or all)")
    # 0..16 intensities -> 0..255 grayscale, white ink on black like MNIST
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)

    def records() -> Iterator[Record]:
        for i in chosen:
            buf = io.BytesIO()
            Image.fromarray(pixels[i], mode="L").save(buf, format="PNG")
            yield Record(source=f"sklearn-digits[{i}]", label=int(digits.target[i]), data=buf.getvalue())

    names = [str(n) for n in digits.target_names]
    return Source(records(), names, f"scikit-learn digits ({split})", total=len(chosen))


def printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (which ``os.fsdecode`` turned into
    lone surrogates) are written ``\\xNN``, as Python's ``backslashreplace`` does."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ignored(name: str) -> bool:
    # Hidden entries (.git, .ipynb_checkpoints, macOS's ._x.jpg resource forks) and the __MACOSX folder a
    # macOS zip adds are never images of the dataset; ImageFolder would make a class of them and fail on them.
    return name.startswith(".") or name == "__MACOSX"


def _unfollowed(real: str, root_real: str, seen: set[str]) -> str | None:
    """Why a link resolving to ``real`` is not followed (None: follow it), ``root_real`` being the source
    folder's real path and ``seen`` the real paths already walked or linked to."""
    if real == root_real or root_real.startswith(real.rstrip(os.sep) + os.sep):
        return "it leads back to the source folder or above it (a loop)"
    if real.startswith(root_real + os.sep):
        # its target is listed at its own place, under its own class: following it would list it twice
        return f"it leads to {printable(os.path.relpath(real, root_real))} inside the source folder"
    if real in seen:
        return "it leads to a file or folder already listed (a loop or a duplicate)"
    return None


def _walk(
    top: str, top_real: str, root_real: str, seen: set[str], notes: list[str]
) -> list[tuple[str, list]]:
    """``(folder, [(file name, problem | None), ...])`` for ``top`` and every folder under it, in the order
    of torchvision's ``sorted(os.walk(top, followlinks=True))``, names sorted within each folder.
    ``seen``: real paths already listed, updated.

    Hidden entries and ``__MACOSX`` are left out. Links are followed (as ImageFolder does) unless
    :func:`_unfollowed` says otherwise; each link not followed is described in ``notes``. An unreadable
    folder is one entry named ``""`` whose problem says why; a file that is not a regular file (a broken
    link, a pipe) has its problem set too, so the check never blocks on reading it.
    """
    found: list[tuple[str, list]] = []
    stack = [(top, top_real)]
    while stack:
        folder, real = stack.pop()
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                # in name order, so which of two links to one target is followed never depends on the disk
                entries = sorted(it, key=lambda entry: entry.name)
        except OSError as e:
            found.append((folder, [("", f"cannot read folder: {e.strerror or e}")]))
            continue
        # Only links lead out of the tree: out there, every entry is checked against what was listed
        outside = real != root_real and not real.startswith(root_real + os.sep)
        files = []
        for entry in entries:
            if _ignored(entry.name):
                continue
            link = entry.is_symlink()
            target = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            if link or outside:
                why = _unfollowed(target, root_real, seen)
                if why is not None:
                    notes.append(f"{printable(entry.path)} not followed: {why}")
                    continue
                seen.add(target)
            try:
                is_dir = entry.is_dir()
                regular = is_dir or entry.is_file()
            except OSError:
                is_dir = regular = False
            if is_dir:
                stack.append((entry.path, target))
                continue
            problem = None
            if not regular:
                problem = "broken link" if link else "not a regular file"
            files.append((entry.name, problem))
        found.append((folder, files))
    found.sort(key=lambda item: item[0])
    return found


def imagefolder_source(root: str | os.PathLike) -> Source:
    """``root/<class>/**/<image>`` in torchvision ``ImageFolder`` order: sorted class folders, then, inside
    each, ``sorted(os.walk(class_folder, followlinks=True))`` with each folder's files sorted.

    Hidden files and folders and ``__MACOSX`` folders are ignored. Any other file whose extension is not an
    image extension is reported as invalid (so a stray ``notes.txt`` is not silently dropped), and so is an
    unreadable folder. Links are followed like ImageFolder does, except those leading back to the source
    folder or above it (loops), to anything inside it (listed at its own place already) or to a target
    already listed: those are listed in the source's ``warnings``. File names that are not UTF-8 are read
    as they are and shown (``source`` column, messages) with their odd bytes as ``\\xNN``.

    Raises :class:`ConversionError` when ``root`` is not a readable folder, holds no class folder, a class
    folder is a link that is not followed, or a class folder holds no files.
    """
    root = Path(root)
    if not root.exists():
        raise ConversionError(f"imagefolder: source folder {printable(str(root))} does not exist")
    if not root.is_dir():
        raise ConversionError(f"imagefolder: source {printable(str(root))} is not a folder")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _ignored(e.name))
    except OSError as e:
        where = printable(str(root))
        raise ConversionError(f"imagefolder: {where}: cannot read folder: {e.strerror or e}") from None
    if not classes:
        raise ConversionError(
            f"imagefolder: {printable(str(root))} holds no class folders (expected {root}/<class>/<image>)"
        )
    root_real = os.path.realpath(root)
    seen: set[str] = set()
    notes: list[str] = []
    # Relative paths as plain strings, one list for all classes: Path objects cost ~5x the memory and time.
    rels: list[str] = []
    problems: dict[int, str] = {}  # position in rels -> what is wrong with it (rare)
    ends: list[int] = []  # ends[label]: one past the class's last entry in rels
    for name in classes:
        top = str(root / name)
        top_real = os.path.realpath(top)
        if os.path.islink(top) and (why := _unfollowed(top_real, root_real, seen)) is not None:
            raise ConversionError(f"imagefolder: class folder {printable(top)} is a link not followed: {why}")
        before = len(rels)
        for dirpath, files in _walk(top, top_real, root_real, seen, notes):
            folder = name + dirpath[len(top) :].replace(os.sep, "/")
            for file, problem in files:
                if problem is not None:
                    problems[len(rels)] = problem
                rels.append(f"{folder}/{file}")
        if len(rels) == before:
            raise ConversionError(f"imagefolder: class folder {printable(top)} holds no files")
        ends.append(len(rels))
    base = str(root)
    expected = ", ".join(IMAGE_EXTENSIONS)

    def records() -> Iterator[Record]:
        start = 0
        for label, end in enumerate(ends):
            for i in range(start, end):
                rel = rels[i]
                problem = problems.get(i)
                if problem is None and not rel.lower().endswith(IMAGE_EXTENSIONS):
                    suffix = PurePosixPath(rel).suffix
                    problem = f"unsupported extension {suffix or '(none)'!r} (expected one of {expected})"
                path = os.path.join(base, rel)
                yield Record(source=printable(rel), label=label, path=path, problem=problem)
            start = end

    names = [printable(c) for c in classes]
    return Source(records(), names, f"image folder {printable(base)}", total=len(rels), warnings=notes)


SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "validation": "val"}


def hf_source(
    name: str, split: str | None = None, image_column: str | None = None, label_column: str | None = None
) -> Source:
    """A Hugging Face dataset through ``datasets.load_dataset``: a hub name or a local folder.

    The image column is cast to ``Image(decode=False)`` so the original encoded bytes are kept (for local
    files ``bytes`` is empty and the file at ``path`` is read instead). Columns are found from the features
    (the first ``Image``; the first ``ClassLabel``, else a column named ``label``) unless named.

    Labels: a ``ClassLabel`` keeps its indices and names; a string column is mapped to the position of each
    name among the sorted distinct names (as ImageFolder sorts its class folders), which become the label
    names; an integer column is kept as is, without names. A missing label (``None``, or HF's ``-1``) is
    stored as -1 and counted as unlabelled, so an unlabelled test split converts. A row without an image or
    with a label outside the class names is an invalid record naming the row.

    Raises :class:`ConversionError` when the dataset, split or columns cannot be found, or the label column
    holds another type (floats, lists...).
    """
    import datasets

    split = split or "train"
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():  # a path, not a hub name
        raise ConversionError(f"hf: local dataset folder {local} does not exist")
    try:
        ds = datasets.load_dataset(str(local) if local.exists() else name, split=split)
    except ValueError as e:
        alias = SPLIT_ALIASES.get(split)
        if alias is None or "split" not in str(e).lower():
            raise ConversionError(f"hf:{name}: {e}") from None
        try:
            ds = datasets.load_dataset(str(local) if local.exists() else name, split=alias)
        except ValueError:
            raise ConversionError(f"hf:{name}: {e}") from None
    except (FileNotFoundError, datasets.exceptions.DatasetsError) as e:
        raise ConversionError(f"hf:{name}: {e}") from None

    features = ds.features
    image_column = image_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.Image)), None
    )
    label_column = label_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)),
        "label" if "label" in features else None,
    )
    for what, col in (("image", image_column), ("label", label_column)):
        if col is None or col not in features:
            raise ConversionError(
                f"hf:{name}: no {what} column found (columns: {', '.join(features)}); "
                f"name it with --{what}-column"
            )
    label_feature = features[label_column]
    dtype = getattr(label_feature, "dtype", None) if isinstance(label_feature, datasets.Value) else None
    by_name: dict[str, int] | None = None
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    elif dtype in ("string", "large_string"):
        names = sorted(v for v in ds.unique(label_column) if v is not None)
        by_name = {n: i for i, n in enumerate(names)}
    elif dtype is not None and dtype.startswith(("int", "uint")):
        names = []
    else:
        raise ConversionError(
            f"hf:{name}: label column {label_column!r} holds {label_feature}; expected a ClassLabel, "
            "integers or strings (name another with --label-column)"
        )
    if isinstance(features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    ds = ds.select_columns([image_column, label_column])

    def record(where: str, image, label) -> Record:
        if label is None:
            label = -1
        elif by_name is not None:
            label = by_name[label]
        problem = None
        if label < -1 or (names and label >= len(names)):
            problem = f"label {label} is not -1 (no label) nor one of the {len(names)} class indices"
            label = -1
        data = path = None
        if isinstance(image, dict):
            data, path = image.get("bytes") or None, image.get("path") or None
        elif isinstance(image, str):
            path = image
        elif isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image) or None
        elif image is not None:
            problem = f"column {image_column!r} holds a {type(image).__name__}, not an image"
        if data is None and path is None:
            problem = problem or f"no image (column {image_column!r} is empty in this row)"
        source = printable(path) if (path and not data) else where
        return Record(source=source, label=int(label), data=data, path=path, problem=problem)

    def records() -> Iterator[Record]:
        row = 0
        for batch in ds.iter(batch_size=256):
            for image, label in zip(batch[image_column], batch[label_column], strict=True):
                yield record(f"hf:{name}[{split}] row {row}", image, label)
                row += 1

    return Source(records(), names, f"hf:{name} ({split})", total=len(ds))


def open_source(
    spec: str, split: str | None = None, image_column: str | None = None, label_column: str | None = None
) -> Source:
    """Parse ``digits``, ``imagefolder:DIR`` or ``hf:NAME`` into a :class:`Source`."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return digits_source(split)
    if kind == "imagefolder" and arg:
        return imagefolder_source(arg)
    if kind == "hf" and arg:
        return hf_source(arg, split, image_column, label_column)
    raise ConversionError(f"unknown source {spec!r}: use digits, imagefolder:DIR or hf:NAME")


# ------------------------------------------------------------------------------------------- conversion
CHECK_CHUNK = 64  # records per task: one task per record costs more than checking a small image
CHECK_CHUNK_BYTES = 4 << 20  # ... and at most this many bytes of images per task (large photos)
# Below this many records threads are as fast: starting and stopping worker processes costs ~0.1 s
PROCESS_MIN_RECORDS = 2_000
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker process: it never waits while the writer writes
MAX_DEFAULT_WORKERS = 8  # default checkers at most: bounds memory in flight (8 x 4 x 4 MiB) on big hosts
STOP_TIMEOUT_S = 60  # how long a failed conversion waits for lance's reader thread to leave our code
WORKER_EXIT_TIMEOUT_S = 5  # how long a terminated checking process gets before it is killed

Checked = tuple[Record, bytes | None, tuple[int, int] | InvalidImage]


def _items(records: list[Record]) -> list[str | bytes]:
    """What :func:`data_prep.check.check_items` reads and checks for ``records``: a path or the bytes of
    each record that is not already known to be unusable."""
    return [r.path if r.data is None else r.data for r in records if not r.problem]


def _merge(records: list[Record], results: list) -> Iterator[Checked]:
    """``(record, data, (width, height) | InvalidImage)`` per record, from
    ``check_items(_items(records))``."""
    it = iter(results)
    for record in records:
        if record.problem:
            yield record, None, InvalidImage(record.source, record.problem)
            continue
        result = next(it)
        if isinstance(result, str):
            yield record, None, InvalidImage(record.source, result)
        else:
            data, width, height = result
            yield record, record.data if data is None else data, (width, height)


def checked_records(records: list[Record]) -> list[Checked]:
    """Read and check ``records`` in this thread (the thread and Ray paths; CheckPool does the same in
    worker processes)."""
    return list(_merge(records, check_items(_items(records))))


def _record_batches(records: Iterable[Record], batch_rows: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, batch_rows)):
        yield chunk


def _record_bytes(record: Record) -> int:
    if record.data is not None:
        return len(record.data)
    try:
        return os.stat(record.path).st_size
    except OSError:
        return 0  # the check names the unreadable file


def _chunks(batch: list[Record]) -> Iterator[list[Record]]:
    """``batch`` in order, split into tasks of at most ``CHECK_CHUNK`` records and ``CHECK_CHUNK_BYTES``."""
    chunk: list[Record] = []
    size = 0
    for record in batch:
        nbytes = 0 if record.problem else _record_bytes(record)
        if chunk and (len(chunk) == CHECK_CHUNK or size + nbytes > CHECK_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += nbytes
    if chunk:
        yield chunk


def _checked_by_threads(batches: Iterable[list[Record]], workers: int) -> Iterator[Iterator[Checked]]:
    """Check each batch with threads (PIL releases the GIL only to decode); yield its results in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in batches:
            yield itertools.chain.from_iterable(pool.map(checked_records, _chunks(chunk)))


class CheckPool:
    """Worker processes that read and check records, for sources too large for threads to check quickly.

    Each worker is a fresh interpreter (never a fork: Lance is not fork-safe) running
    :func:`data_prep.check.serve`, which imports only PIL. Unlike multiprocessing's spawn it does not
    re-import the caller's ``__main__`` (Lance under the CLI, anything at all in a user's script). Requests
    and results travel over two inherited pipes (POSIX only). Workers are in their own process group, so a
    Ctrl-C reaches only this process, which stops them with :meth:`close`; they also exit when this process
    dies (their request pipe closes). One thread per worker sends it a chunk and waits for the result; at
    most ``IN_FLIGHT_PER_WORKER`` chunks (each at most ``CHECK_CHUNK`` records and ``CHECK_CHUNK_BYTES``)
    per worker are in flight, so memory stays bounded however large the source is.
    """

    def __init__(self, workers: int):
        self.in_flight = IN_FLIGHT_PER_WORKER * workers
        root = str(Path(__file__).resolve().parent.parent)  # where data_prep is importable from
        code = (
            "import sys, json; sys.path.insert(0, sys.argv[1]); from data_prep.check import serve; "
            "serve(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))"
        )
        settings = json.dumps(pil_settings())
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[tuple[subprocess.Popen, Connection, Connection]] = []
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="check")
        try:
            for _ in range(workers):
                requests_r, requests_w = os.pipe()
                results_r, results_w = os.pipe()
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", code, root, str(requests_r), str(results_w), settings],
                        stdin=subprocess.DEVNULL,
                        pass_fds=(requests_r, results_w),
                        process_group=0,
                    )
                except BaseException:
                    os.close(requests_w)
                    os.close(results_r)
                    raise
                finally:
                    os.close(requests_r)
                    os.close(results_w)
                worker = (proc, Connection(requests_w, readable=False), Connection(results_r, writable=False))
                self._workers.append(worker)
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    def _check(self, items: list[str | bytes]) -> list:
        worker = self._idle.get()
        proc = worker[0]
        try:
            worker[1].send(items)
            return worker[2].recv()
        except (EOFError, OSError) as e:
            try:
                code = proc.wait(WORKER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            if code is None:
                how = f"stopped answering ({type(e).__name__}: {e})"
            elif code < 0:
                how = f"was killed by signal {-code}" + (" (the out-of-memory killer?)" if code == -9 else "")
            else:
                how = f"exited with code {code}"
            raise ConversionError(f"a checking worker process (pid {proc.pid}) {how}") from None
        finally:
            self._idle.put(worker)  # even a dead one: the next chunk then fails at once instead of waiting

    def checked(self, batches: Iterable[list[Record]]) -> Iterator[Iterator[Checked]]:
        """Yield per batch an iterator over its ``(record, data, (width, height) | InvalidImage)``, in order.

        Later batches are read and checked while the caller consumes the current one. A worker process that
        dies raises :class:`ConversionError` naming the records it was checking.
        """
        parts = (
            (part, i == len(split) - 1)
            for batch in batches
            for split in [list(_chunks(batch))]
            for i, part in enumerate(split)
        )
        pending: deque = deque()  # (records, last of its batch, future), in source order

        def top_up() -> None:
            while len(pending) < self.in_flight:
                part, last = next(parts, (None, None))
                if part is None:
                    return
                pending.append((part, last, self._threads.submit(self._check, _items(part))))

        def batch() -> Iterator[Checked]:
            last = False
            while not last:
                top_up()
                part, last, future = pending.popleft()
                try:
                    results = future.result()
                except ConversionError as e:
                    where = f"{part[0].source} to {part[-1].source}"
                    raise ConversionError(f"{e} while checking {where}") from None
                yield from _merge(part, results)

        try:
            while True:
                top_up()
                if not pending:
                    return
                yield batch()
        finally:
            for *_, future in pending:
                future.cancel()

    def close(self) -> None:
        """Stop the workers, whatever they are doing, and return once every one has exited (killed after
        ``WORKER_EXIT_TIMEOUT_S`` if need be). Idempotent.

        Checks still queued are cancelled and one running fails: by now nobody wants their results.
        """
        self._threads.shutdown(wait=False, cancel_futures=True)
        for proc, _, _ in self._workers:
            proc.terminate()
        for proc, _, _ in self._workers:
            try:
                proc.wait(WORKER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._threads.shutdown(wait=True)  # a thread waiting on a worker has had EOFError by now
        for _, requests, results in self._workers:
            requests.close()
            results.close()
        self._workers = []


def _batches(
    checked: Iterable[Iterable[Checked]],
    max_rows: int | None,
    skip_invalid: bool,
    skipped: list[str],
    stats: dict,
    progress: tqdm,
    description: str,
) -> Iterator[pa.RecordBatch]:
    """One record batch per batch of checked records: valid rows numbered in order, up to ``max_rows``.

    An invalid record raises :class:`InvalidImage`, or with ``skip_invalid`` is listed in ``skipped``;
    raises :class:`ConversionError` when no record is valid.
    """
    rows = 0
    for results in checked:
        cols: dict[str, list] = {f.name: [] for f in SCHEMA}
        for record, data, result in results:
            progress.update(1)
            if isinstance(result, InvalidImage):
                record_invalid(result, skip_invalid, skipped, progress)
                continue
            if max_rows is not None and rows >= max_rows:
                break
            cols["image"].append(data)
            cols["label"].append(record.label)
            cols["id"].append(rows)
            cols["source"].append(record.source)
            cols["width"].append(result[0])
            cols["height"].append(result[1])
            stats["image_bytes"] += len(data)
            stats["labels"][record.label] += 1
            rows += 1
        if cols["id"]:
            yield pa.RecordBatch.from_pydict(cols, schema=SCHEMA)
        if max_rows is not None and rows >= max_rows:
            break
    if rows == 0:
        more = f" ({len(skipped)} invalid skipped)" if skipped else ""
        raise ConversionError(f"{description}: no valid images to write{more}")


def _usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _dataset_exists(uri: str, storage_options: dict | None) -> bool:
    try:
        lance.dataset(uri, storage_options=storage_options)
        return True
    except (ValueError, OSError, FileNotFoundError):
        return False


def dir_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``path``."""
    apparent = allocated = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += getattr(st, "st_blocks", st.st_size // 512) * 512
    return apparent, allocated


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
    workers: int | None = None,
    progress: bool = True,
    engine: str = "local",
) -> Summary:
    """Convert ``source`` (a spec string or a :class:`Source`) into a Lance dataset at ``output``.

    Raises :class:`ConversionError` (or :class:`InvalidImage`) with a message naming the file, row or path
    at fault. On any failure, interruption included, nothing is left at a new ``output`` (nor the folders
    made for it), an existing dataset keeps its previous version as the latest, and no worker process or
    thread of ours is running. The :class:`Summary` counts rows with label -1 (``unlabelled``) and carries
    the source's ``warnings`` (links not followed); both are also in the schema metadata.

    ``workers``: how many checks run at once (default: the usable CPUs). With the local engine, a source of
    ``PROCESS_MIN_RECORDS`` or more (known from its ``total``, capped by ``max_rows``) is checked by that
    many worker processes (:class:`CheckPool`), a smaller one by threads (at most 4 by default).
    """
    uri = str(output)
    remote = _is_remote(uri)
    if max_rows is not None and max_rows < 1:
        raise ConversionError(f"--max-rows must be at least 1, got {max_rows}")
    if rows_per_file < 1:
        raise ConversionError(f"--rows-per-file must be at least 1, got {rows_per_file}")
    if batch_rows < 1:
        raise ConversionError(f"--batch-rows must be at least 1, got {batch_rows}")
    if workers is not None and workers < 1:
        raise ConversionError(f"--workers must be at least 1, got {workers}")
    exists = _dataset_exists(uri, storage_options)
    if not remote:
        path = Path(uri)
        if path.exists() and not path.is_dir():
            raise ConversionError(f"output {uri} exists and is a file, not a Lance dataset")
        if path.is_dir() and not exists and any(path.iterdir()):
            raise ConversionError(
                f"output {uri} is a non-empty folder that is not a Lance dataset; refusing to write there"
            )
    if exists and not overwrite:
        raise ConversionError(f"output {uri} already holds a Lance dataset; pass --overwrite to replace it")

    src = source if isinstance(source, Source) else open_source(source, split, image_column, label_column)
    skipped: list[str] = []
    stats = {"image_bytes": 0, "labels": Counter()}  # rows per label
    failure: list[BaseException] = []
    # The generator runs on lance's reader thread. Once this thread fails (an interrupt arrives here, not
    # there) it must stop and be out of our code before we return: Python code still running on a foreign
    # thread at interpreter exit aborts the process.
    stop = threading.Event()
    running = threading.Lock()  # held while the reader thread is inside the generator

    def guarded(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        try:
            while True:
                with running:
                    if stop.is_set():
                        raise ConversionError("conversion stopped")
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch
        except BaseException as e:
            if not stop.is_set():  # keep its exception so the caller sees ours, not Arrow's
                failure.append(e)
            raise

    # New local datasets are built beside the destination and renamed into place when complete.
    staging = None
    target = uri
    made: list[Path] = []  # folders created for the output, removed again if the conversion fails
    if not remote and not exists:
        dest = Path(uri)
        made = [p for p in dest.absolute().parents if not p.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        target = str(staging)

    pool: CheckPool | None = None
    generators: list[Iterator] = []  # ours that the reader thread runs, closed on failure
    start = time.perf_counter()
    bar = tqdm(total=src.total, unit="img", desc=f"converting {src.description}", disable=not progress)
    try:
        # Data files first, then one commit whose schema metadata already lists what was skipped: a failure
        # before the commit leaves the dataset (or its absence) exactly as it was.
        if engine == "ray":
            from .ray_engine import write_fragments_ray

            fragments = write_fragments_ray(
                src.records,
                target,
                mode="overwrite" if exists else "create",
                rows_per_file=rows_per_file,
                storage_options=storage_options,
                block_rows=batch_rows,
                max_rows=max_rows,
                skip_invalid=skip_invalid,
                skipped=skipped,
                stats=stats,
                progress=bar,
                description=src.description,
            )
        elif engine == "local":
            records = _record_batches(src.records, batch_rows)
            expected = src.total if max_rows is None or src.total is None else min(src.total, max_rows)
            processes = workers or min(MAX_DEFAULT_WORKERS, _usable_cpus())
            large = expected is not None and expected >= PROCESS_MIN_RECORDS
            if processes > 1 and large and os.name == "posix":  # CheckPool's pipes are POSIX descriptors
                pool = CheckPool(processes)
                checked = pool.checked(records)
            else:
                checked = _checked_by_threads(records, workers or min(4, _usable_cpus()))
            batches = _batches(checked, max_rows, skip_invalid, skipped, stats, bar, src.description)
            generators += [batches, checked]
            reader = pa.RecordBatchReader.from_batches(SCHEMA, guarded(batches))
            fragments = write_fragments(
                reader,
                target,
                schema=SCHEMA,
                mode="overwrite" if exists else "create",
                max_rows_per_file=rows_per_file,
                storage_options=storage_options,
            )
            if pool is not None:
                pool.close()
                pool = None
        else:
            raise ConversionError(f"unknown engine {engine!r} (choose local or ray)")
        info = {
            "source": src.description,
            "skipped": skipped,
            "unlabelled": stats["labels"][-1],
            "warnings": src.warnings,
        }
        schema = SCHEMA.with_metadata(
            {LABEL_NAMES_KEY: json.dumps(src.label_names).encode(), METADATA_KEY: json.dumps(info).encode()}
        )
        read_version = lance.dataset(uri, storage_options=storage_options).version if exists else None
        ds = lance.LanceDataset.commit(
            target,
            lance.LanceOperation.Overwrite(schema, fragments),
            read_version=read_version,
            storage_options=storage_options,
        )
        if staging is not None:
            os.replace(staging, uri)
            staging = None
            ds = lance.dataset(uri)
    except BaseException as e:
        try:
            stop.set()
            if pool is not None:
                pool.close()  # a reader thread waiting for a check gets an error and leaves
            if running.acquire(timeout=STOP_TIMEOUT_S):  # the reader thread is out of the generator
                try:
                    for gen in generators:  # ends the checking threads too (their executor's with block)
                        gen.close()
                finally:
                    running.release()
            else:
                warnings.warn(
                    f"lance's reader thread did not leave the conversion within {STOP_TIMEOUT_S} s",
                    RuntimeWarning,
                    stacklevel=2,
                )
        finally:  # even if a second Ctrl-C arrives while stopping
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            for folder in made:  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty: something else wrote there meanwhile
        if failure and failure[0] is not e:
            raise failure[0] from None
        raise
    finally:
        if pool is not None:
            pool.close()
        bar.close()
    seconds = time.perf_counter() - start
    return Summary(
        output=uri,
        rows=ds.count_rows(),
        classes=len(src.label_names) or sum(1 for label in stats["labels"] if label >= 0),
        image_bytes=stats["image_bytes"],
        disk_bytes=None if remote else dir_bytes(uri)[0],
        seconds=seconds,
        version=ds.version,
        skipped=skipped,
        unlabelled=stats["labels"][-1],
        warnings=src.warnings,
    )


def add_storage_option_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--storage-option KEY=VALUE``; read it as ``dict(args.storage_option)``."""
    parser.add_argument(
        "--storage-option",
        action="append",
        type=storage_option_arg,
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def record_invalid(error: InvalidImage, skip_invalid: bool, skipped: list[str], progress: tqdm) -> None:
    """Raise ``error``, or with ``skip_invalid`` list it as skipped and show the count on the progress bar."""
    if not skip_invalid:
        raise error
    skipped.append(str(error))
    progress.set_postfix(skipped=len(skipped))


def storage_option_arg(text: str) -> tuple[str, str]:
    """argparse ``type=`` for a repeatable ``--storage-option KEY=VALUE``; ``dict(args.storage_option)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.convert",
        description="Convert an image dataset into Lance, keeping each image's original encoded bytes.",
    )
    p.add_argument(
        "--source", required=True, help="digits | imagefolder:DIR | hf:NAME (hub name or local folder)"
    )
    p.add_argument("--output", required=True, help="destination Lance URI (local path or s3://...)")
    p.add_argument("--split", help="split to convert (hf: train/validation/test...; digits: train/test/all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset (as a new version)")
    p.add_argument("--max-rows", type=int, help="stop after N valid rows (in source order)")
    p.add_argument("--rows-per-file", type=int, default=1024 * 1024, help="max rows per Lance data file")
    p.add_argument("--image-column", help="hf: image column (default: the first Image feature)")
    p.add_argument("--label-column", help="hf: label column (default: the first ClassLabel feature)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip images that fail their check, list them, and record them in the metadata",
    )
    add_storage_option_argument(p, "object-store option passed to Lance (repeatable)")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine, checking with worker processes (threads for small sources); ray: check "
        "and write in parallel on a Ray cluster (RAY_ADDRESS, else a local one), then one commit here",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="images checked at once (default: the usable CPUs; worker processes for 2,000 images or more)",
    )
    p.add_argument(
        "--batch-rows", type=int, default=512, metavar="N", help="rows per record batch streamed to Lance"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
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
                workers=args.workers,
                progress=not args.no_progress,
                engine=args.engine,
            )
    except ConversionError as e:
        hint = " (pass --skip-invalid to skip such files)" if isinstance(e, InvalidImage) else ""
        print(f"error: {e}{hint}; nothing was written to {args.output}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
