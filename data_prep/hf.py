"""``hf:NAME``: a Hugging Face dataset, read through ``datasets.load_dataset``.

``NAME`` is a hub name or a local folder laid out like a hub repository; each image's original encoded
bytes are kept.

``datasets`` is imported on use: it is heavy, and the checking workers import the conversion's modules again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .check import ConversionError
from .sources import Record, Source, printable

if TYPE_CHECKING:
    import datasets

__all__ = ["hf_source"]

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
    ds = _load(name, split)
    image_column, label_column = _columns(name, ds.features, image_column, label_column)
    names, by_name = _label_names(name, ds, label_column)
    if isinstance(ds.features[image_column], datasets.Image):
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


def _load(name: str, split: str) -> datasets.Dataset:
    """``split`` of the dataset ``name`` (a hub name or a local folder).

    When the dataset has no split of that name, its alias (``val`` for ``validation`` ...) is loaded.
    """
    import datasets

    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():  # a path, not a hub name
        raise ConversionError(f"hf: local dataset folder {local} does not exist")
    try:
        return datasets.load_dataset(str(local) if local.exists() else name, split=split)
    except ValueError as e:
        alias = SPLIT_ALIASES.get(split)
        if alias is None or "split" not in str(e).lower():
            raise ConversionError(f"hf:{name}: {e}") from None
        try:
            return datasets.load_dataset(str(local) if local.exists() else name, split=alias)
        except ValueError:
            raise ConversionError(f"hf:{name}: {e}") from None
    except (FileNotFoundError, datasets.exceptions.DatasetsError) as e:
        raise ConversionError(f"hf:{name}: {e}") from None


def _columns(
    name: str, features: datasets.Features, image_column: str | None, label_column: str | None
) -> tuple[str, str]:
    """The image and label columns.

    Those named, else the first ``Image`` feature and the first ``ClassLabel`` (else a column named
    ``label``).
    """
    import datasets

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
    return image_column, label_column


def _label_names(
    name: str, ds: datasets.Dataset, label_column: str
) -> tuple[list[str], dict[str, int] | None]:
    """``(names, by_name)``: the class names of ``label_column`` and the index of each name.

    ``by_name`` maps each name of a string column to its index (sorted, as ImageFolder sorts its class
    folders); ``None`` for a ``ClassLabel`` or integers.
    """
    import datasets

    feature = ds.features[label_column]
    dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else None
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    if dtype in ("string", "large_string"):
        names = sorted(v for v in ds.unique(label_column) if v is not None)
        return names, {n: i for i, n in enumerate(names)}
    if dtype is not None and dtype.startswith(("int", "uint")):
        return [], None
    raise ConversionError(
        f"hf:{name}: label column {label_column!r} holds {feature}; expected a ClassLabel, "
        "integers or strings (name another with --label-column)"
    )
