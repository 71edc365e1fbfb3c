"""Sources of a conversion (digits, imagefolder:DIR, hf:NAME): each yields records and knows its class names.

A record is an image's bytes or path, its label and its provenance.

SOURCE is one of
  digits            the UCI handwritten digits bundled with scikit-learn, stored as PNG (offline default)
  imagefolder:DIR   DIR/<class>/<image>; class index = position in the sorted class folder names, rows in
                    torchvision ImageFolder's order; hidden entries and __MACOSX ignored, links followed
                    unless they loop or lead to something listed already (``data_prep.imagefolder``)
  hf:NAME           a Hugging Face dataset (hub name or a local folder laid out like a hub repository);
                    a missing label is stored as -1 (``data_prep.hf``)

A source only lists; reading and checking the images is ``data_prep.pool``'s work. Paths in records are
absolute, so they mean the same in every process and on every node of a Ray cluster that shares them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from PIL import Image

from .check import ConversionError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Record",
    "Source",
    "digits_source",
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
    """The order ``--shuffle SEED`` writes ``n`` records in.

    It is ``numpy.random.default_rng(seed).permutation(n)`` (an array of positions in source order).

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
    r"""``text`` safe to print on one line of a terminal, and valid UTF-8.

    The bytes of a file name that is not UTF-8 (which ``os.fsdecode`` turned into lone surrogates) are
    written ``\xNN``, as Python's ``backslashreplace`` does; so are control characters (C0, DEL and C1:
    ESC as ``\x1b``, CR as ``\r`` ...), which a terminal would act on (bat#3691). Idempotent: what it
    returns holds no character it escapes. Every message of the conversion that names a file goes through it.
    """
    if text.isprintable():  # the usual name: no control character, no lone surrogate
        return text
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match) -> str:
    char = match.group()
    return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char) or f"\\x{ord(char):02x}"


def open_source(
    spec: str, split: str | None = None, image_column: str | None = None, label_column: str | None = None
) -> Source:
    """Parse ``digits``, ``imagefolder:DIR`` or ``hf:NAME`` into a :class:`Source`."""
    # Imported here: data_prep.imagefolder and data_prep.hf import Record and Source from this module
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return digits_source(split)
    if kind == "imagefolder" and arg:
        from .imagefolder import imagefolder_source

        return imagefolder_source(arg)
    if kind == "hf" and arg:
        from .hf import hf_source

        return hf_source(arg, split, image_column, label_column)
    raise ConversionError(f"unknown source {spec!r}: use digits, imagefolder:DIR or hf:NAME")
