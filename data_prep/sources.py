"""Sources of a conversion (digits, imagefolder:DIR, hf:NAME): each yields records and knows its class names.

A record is an image's bytes or path, its label and its provenance.

SOURCE is one of
  digits            the UCI handwritten digits bundled with scikit-learn, stored as PNG (offline default)
  imagefolder:DIR   DIR/<class>/<image>; class index = position in the sorted class folder names, rows in
                    torchvision ImageFolder's order; hidden entries and __MACOSX ignored, links followed
                    unless they loop or lead to something listed already (see imagefolder_source)
  hf:NAME           a Hugging Face dataset (hub name or a local folder laid out like a hub repository);
                    a missing label is stored as -1 (see hf_source)

A source only lists; reading and checking the images is ``data_prep.pool``'s work. Paths in records are
absolute, so they mean the same in every process and on every node of a Ray cluster that shares them.
"""

from __future__ import annotations

import io
import os
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from PIL import Image

from .check import ConversionError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Record",
    "Source",
    "digits_source",
    "hf_source",
    "imagefolder_source",
    "open_source",
    "permutation",
    "printable",
    "shuffled",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


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
    """A stream of records plus what is known about it before reading it.

    ``at``, when the source can give its records in any order: ``at(positions)`` yields the records at
    those positions of ``records`` (0-based, each at most once), in that order; :func:`shuffled` needs it.
    """

    records: Iterable[Record]
    label_names: list[str]
    description: str
    total: int | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. links not followed; shown with the summary
    at: Callable[[Sequence[int]], Iterator[Record]] | None = None


def permutation(n: int, seed: int) -> Sequence[int]:
    """The order ``--shuffle SEED`` writes ``n`` records in: ``numpy.random.default_rng(seed).permutation(n)``
    (an array of positions in source order).

    Only positions are permuted (8 bytes a record); the images are read in that order afterwards, a batch
    at a time, so memory does not grow with the images' size.
    """
    import numpy as np

    return np.random.default_rng(seed).permutation(n)


def shuffled(source: Source, seed: int) -> Source:
    """``source`` with its records in the order :func:`permutation` gives for ``seed``.

    Raises :class:`ConversionError` for a source that cannot be read out of order (no ``at``, or no
    ``total``).
    """
    if source.at is None or source.total is None:
        raise ConversionError(
            f"{source.description}: this source cannot be shuffled (it is read in one pass)"
        )
    order = permutation(source.total, seed)
    return replace(
        source, records=source.at(order), description=f"{source.description}, shuffled (seed {seed})"
    )


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

    def at(positions: Iterable[int]) -> Iterator[Record]:
        for i in chosen[positions]:
            buf = io.BytesIO()
            Image.fromarray(pixels[i], mode="L").save(buf, format="PNG")
            yield Record(source=f"sklearn-digits[{i}]", label=int(digits.target[i]), data=buf.getvalue())

    names = [str(n) for n in digits.target_names]
    return Source(
        at(np.arange(len(chosen))), names, f"scikit-learn digits ({split})", total=len(chosen), at=at
    )


# C0 controls, DEL and C1 controls. A terminal acts on them instead of showing them: ESC starts a sequence
# that retitles, clears or recolours it, BEL rings, CR returns to the start of the line so that the rest
# overwrites what was printed. File names are untrusted (a scraped dataset, a shared folder), so none of
# them may reach a terminal raw (bat#3691, duperemove#353: the t3-sec-terminal-escapes report).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to print on one line of a terminal, and valid UTF-8.

    The bytes of a file name that is not UTF-8 (which ``os.fsdecode`` turned into lone surrogates) are
    written ``\\xNN``, as Python's ``backslashreplace`` does; so are control characters (C0, DEL and C1:
    ESC as ``\\x1b``, CR as ``\\r`` ...), which a terminal would act on (bat#3691). Idempotent: what it
    returns holds no character it escapes. Every message of the conversion that names a file goes through it.
    """
    if text.isprintable():  # the usual name: no control character, no lone surrogate
        return text
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match) -> str:
    char = match.group()
    return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char) or f"\\x{ord(char):02x}"


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
            f"imagefolder: {printable(str(root))} holds no class folders (expected "
            f"{printable(str(root))}/<class>/<image>)"
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
    # Resolved here, where the command runs: a worker process or Ray task may run in another directory
    base = os.path.abspath(root)
    expected = ", ".join(IMAGE_EXTENSIONS)

    def at(positions: Iterable[int]) -> Iterator[Record]:
        for i in positions:
            rel = rels[i]
            problem = problems.get(i)
            if problem is None and not rel.lower().endswith(IMAGE_EXTENSIONS):
                suffix = PurePosixPath(rel).suffix
                problem = f"unsupported extension {suffix or '(none)'!r} (expected one of {expected})"
            path = os.path.join(base, rel)
            # the label is the class whose slice of rels holds i
            yield Record(source=printable(rel), label=bisect_right(ends, i), path=path, problem=problem)

    names = [printable(c) for c in classes]
    description = f"image folder {printable(str(root))}"
    return Source(at(range(len(rels))), names, description, total=len(rels), warnings=notes, at=at)


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

    def at(positions: Sequence[int] | None) -> Iterator[Record]:
        # select() only maps indices (8 bytes a row); the rows are read batch by batch as they are needed
        rows = ds if positions is None else ds.select(positions)
        numbers = iter(range(len(ds)) if positions is None else positions)
        for batch in rows.iter(batch_size=256):
            for image, label in zip(batch[image_column], batch[label_column], strict=True):
                yield record(f"hf:{name}[{split}] row {next(numbers)}", image, label)

    return Source(at(None), names, f"hf:{name} ({split})", total=len(ds), at=at)


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
