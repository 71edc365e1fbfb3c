"""Convert an image dataset into Lance, keeping every image's original encoded bytes.

    python -m data_prep.convert --source SOURCE --output URI [--split NAME] [--overwrite]
                                [--max-rows N] [--rows-per-file N] [--skip-invalid]
                                [--engine local|ray] [--storage-option KEY=VALUE ...]

SOURCE is one of
  digits            the UCI handwritten digits bundled with scikit-learn, stored as PNG (offline default)
  imagefolder:DIR   DIR/<class>/<image>; class index = position in the sorted class folder names
  hf:NAME           a Hugging Face dataset (hub name or a local folder laid out like a hub repository)

Every image is checked (PIL open + verify + a decode at reduced scale) before it is written. Rows are
streamed into ``lance.write_dataset`` batch by batch, so memory stays flat however large the source is.
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
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lance
import pyarrow as pa
from lance.fragment import write_fragments
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

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


class ConversionError(Exception):
    """Bad input for a conversion; the message names the file, row or path at fault."""


class InvalidImage(ConversionError):
    """One image failed its check; ``where`` names the file or row."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class Record:
    """One source image: its encoded bytes (or the path to read them from), label and provenance."""

    source: str
    label: int
    data: bytes | None = None
    path: str | None = None
    problem: str | None = None  # set by a source that already knows the record is unusable

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            return f.read()


@dataclass
class Source:
    """A stream of records plus what is known about it before reading it."""

    records: Iterable[Record]
    label_names: list[str]
    description: str
    total: int | None = None
    warnings: list[str] = field(default_factory=list)


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
        if self.skipped:
            line += f"\nskipped {len(self.skipped)} invalid image(s):\n  " + "\n  ".join(self.skipped)
        return line


# ----------------------------------------------------------------------------------------------- checks
def check_image(data: bytes, where: str) -> tuple[int, int]:
    """Return ``(width, height)`` of an encoded image, or raise :class:`InvalidImage` naming ``where``.

    Opens the image with PIL, runs ``verify()`` (checksums, structure) and then really decodes it,
    at 1/8 scale for JPEG (libjpeg's DCT scaling keeps this cheap), which is what catches truncated files.
    Images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused as decompression bombs.
    """
    if not data:
        raise InvalidImage(where, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise InvalidImage(
                    where,
                    f"decompression bomb: {width}x{height} = {width * height:,} pixels is more than "
                    f"PIL.Image.MAX_IMAGE_PIXELS ({limit:,})",
                )
            if im.format == "JPEG":
                # PIL's verify() checks nothing for JPEG: decode on this handle instead of parsing the
                # headers a second time (half the cost of a check of a small JPEG)
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
                return width, height
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except InvalidImage:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidImage(where, f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise InvalidImage(where, f"not a readable image ({len(data):,} bytes PIL cannot identify)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise InvalidImage(where, f"corrupt image: {e}") from None
    return width, height


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


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def imagefolder_source(root: str | os.PathLike) -> Source:
    """``root/<class>/**/<image>`` in torchvision ``ImageFolder`` order: sorted classes, sorted files.

    Hidden files are ignored; any other file whose extension is not an image extension is reported as
    invalid (so a stray ``notes.txt`` is not silently dropped); an empty class folder is an error.
    """
    root = Path(root)
    if not root.exists():
        raise ConversionError(f"imagefolder: source folder {root} does not exist")
    if not root.is_dir():
        raise ConversionError(f"imagefolder: source {root} is not a folder")
    classes = _class_folders(root)
    if not classes:
        raise ConversionError(f"imagefolder: {root} holds no class folders (expected {root}/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
        if not found:
            raise ConversionError(f"imagefolder: class folder {root / name} holds no files")
        files += [(p, label) for p in found]

    def records() -> Iterator[Record]:
        for path, label in files:
            rel = path.relative_to(root).as_posix()
            problem = None
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                expected = ", ".join(IMAGE_EXTENSIONS)
                problem = f"unsupported extension {path.suffix or '(none)'!r} (expected one of {expected})"
            yield Record(source=rel, label=label, path=str(path), problem=problem)

    return Source(records(), classes, f"image folder {root}", total=len(files))


SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "validation": "val"}


def hf_source(
    name: str, split: str | None = None, image_column: str | None = None, label_column: str | None = None
) -> Source:
    """A Hugging Face dataset through ``datasets.load_dataset``: a hub name or a local folder.

    The image column is cast to ``Image(decode=False)`` so the original encoded bytes are kept (for local
    files ``bytes`` is empty and the file at ``path`` is read instead). Columns are found from the features
    (``Image``, ``ClassLabel``) unless named.
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
    except FileNotFoundError as e:
        raise ConversionError(f"hf:{name}: {e}") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise ConversionError(f"hf:{name}: {e}") from None

    features = ds.features
    image_column = image_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.Image)), None
    )
    label_column = label_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None
    )
    for what, col in (("image", image_column), ("label", label_column)):
        if col is None or col not in features:
            raise ConversionError(
                f"hf:{name}: no {what} column found (columns: {', '.join(features)}); "
                f"name it with --{what}-column"
            )
    label_feature = features[label_column]
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else []
    if isinstance(features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    ds = ds.select_columns([image_column, label_column])

    def records() -> Iterator[Record]:
        row = 0
        for batch in ds.iter(batch_size=256):
            for image, label in zip(batch[image_column], batch[label_column], strict=True):
                where = f"hf:{name}[{split}] row {row}"
                if isinstance(image, dict):
                    data, path = image.get("bytes"), image.get("path")
                    source = path if (path and not data) else where
                    yield Record(source=source, label=int(label), data=data or None, path=path)
                else:
                    yield Record(source=where, label=int(label), data=bytes(image))
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
CHECK_CHUNK = 64  # records per thread task: one task per record costs more than checking a small image


def _checked(record: Record) -> tuple[Record, bytes | None, tuple[int, int] | InvalidImage]:
    try:
        if record.problem:
            raise InvalidImage(record.source, record.problem)
        try:
            data = record.read()
        except OSError as e:
            raise InvalidImage(record.source, f"cannot read file: {e.strerror or e}") from None
        return record, data, check_image(data, record.source)
    except InvalidImage as e:
        return record, None, e


def _checked_chunk(records: list[Record]) -> list[tuple[Record, bytes | None, tuple[int, int] | Exception]]:
    return [_checked(record) for record in records]


def _batches(
    records: Iterable[Record],
    batch_rows: int,
    max_rows: int | None,
    skip_invalid: bool,
    skipped: list[str],
    stats: dict,
    progress: tqdm,
    workers: int,
    description: str,
) -> Iterator[pa.RecordBatch]:
    """Check records in parallel (PIL releases the GIL while decoding) and yield bounded record batches."""
    it = iter(records)
    rows = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while max_rows is None or rows < max_rows:
            chunk = []
            for record in it:
                chunk.append(record)
                if len(chunk) == batch_rows:
                    break
            if not chunk:
                break
            cols: dict[str, list] = {f.name: [] for f in SCHEMA}
            parts = [chunk[i : i + CHECK_CHUNK] for i in range(0, len(chunk), CHECK_CHUNK)]
            for record, data, result in itertools.chain.from_iterable(pool.map(_checked_chunk, parts)):
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
                stats["labels"].add(record.label)
                rows += 1
            if cols["id"]:
                yield pa.RecordBatch.from_pydict(cols, schema=SCHEMA)
    if rows == 0:
        more = f" ({len(skipped)} invalid skipped)" if skipped else ""
        raise ConversionError(f"{description}: no valid images to write{more}")


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
    at fault. On any failure, interruption included, nothing is left at a new ``output`` and an existing
    dataset keeps its previous version as the latest.
    """
    uri = str(output)
    remote = _is_remote(uri)
    if max_rows is not None and max_rows < 1:
        raise ConversionError(f"--max-rows must be at least 1, got {max_rows}")
    if rows_per_file < 1:
        raise ConversionError(f"--rows-per-file must be at least 1, got {rows_per_file}")
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
    stats = {"image_bytes": 0, "labels": set()}
    failure: list[BaseException] = []

    # The generator runs inside lance's writer; keep its exception so the caller sees ours, not Arrow's.
    def guarded(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except BaseException as e:
            failure.append(e)
            raise

    # New local datasets are built beside the destination and renamed into place when complete.
    staging = None
    target = uri
    if not remote and not exists:
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        target = str(staging)

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
            batches = _batches(
                src.records,
                batch_rows,
                max_rows,
                skip_invalid,
                skipped,
                stats,
                bar,
                workers or min(4, os.cpu_count() or 1),
                src.description,
            )
            reader = pa.RecordBatchReader.from_batches(SCHEMA, guarded(batches))
            fragments = write_fragments(
                reader,
                target,
                schema=SCHEMA,
                mode="overwrite" if exists else "create",
                max_rows_per_file=rows_per_file,
                storage_options=storage_options,
            )
        else:
            raise ConversionError(f"unknown engine {engine!r} (choose local or ray)")
        info = {"source": src.description, "skipped": skipped}
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
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if failure and failure[0] is not e:
            raise failure[0] from None
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return Summary(
        output=uri,
        rows=ds.count_rows(),
        classes=len(src.label_names) or len(stats["labels"]),
        image_bytes=stats["image_bytes"],
        disk_bytes=None if remote else dir_bytes(uri)[0],
        seconds=seconds,
        version=ds.version,
        skipped=skipped,
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
        help="local: one process, checking with threads; ray: check and write in parallel on a Ray cluster "
        "(RAY_ADDRESS, else a local one), then one commit here",
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
