"""Open a Lance image dataset for PyTorch: ``SafeLanceDataset`` with a clear error for a bad URI."""

from __future__ import annotations

import json
import os
from typing import Any

import lance
from lance.torch.data import SafeLanceDataset

__all__ = ["open_dataset", "LanceImageDataset", "Rows", "label_names", "dataset_options", "DatasetNotFound"]


class DatasetNotFound(FileNotFoundError):
    """The URI does not hold a readable Lance dataset (or the requested version)."""


def dataset_options(version: int | str | None = None, storage_options: dict[str, str] | None = None) -> dict:
    """The ``lance.dataset`` keyword arguments that ``SafeLanceDataset`` hands to every worker."""
    options: dict[str, Any] = {}
    if version is not None:
        options["version"] = version
    if storage_options:
        options["storage_options"] = dict(storage_options)
    return options


def _open(uri: str | os.PathLike, options: dict) -> lance.LanceDataset:
    uri = os.fspath(uri)
    try:
        return lance.dataset(uri, **options)
    except (ValueError, OSError) as e:
        what = f"version {options['version']} of " if "version" in options else ""
        reason = str(e).split(", /")[0]  # drop the Rust source locations lance appends
        raise DatasetNotFound(f"cannot open {what}Lance dataset at {uri!r}: {reason}") from None


class Rows(list):
    """The rows of one batched read: a plain ``list[dict]`` (``default_collate`` and any other collate take
    it as one) that also knows where each row came from.

    ``indices[i]`` is the dataset position of ``rows[i]``; ``describe(i)`` names that row and looks up its
    ``source`` (or ``id``) column only then, so a decode error can name the file although the batch read
    only the image and label columns. The dicts themselves hold exactly the columns read.
    """

    def __init__(self, rows: list[dict[str, Any]], dataset: LanceImageDataset, indices: list[int]):
        super().__init__(rows)
        self.dataset = dataset
        self.indices = list(indices)

    def __reduce__(self):
        return (list, (list(self),))  # a plain list: no dataset handle rides along to another process

    def describe(self, position: int) -> str:
        index = self.indices[position]
        ds = self.dataset._ds
        if ds is None:
            ds = lance.dataset(self.dataset.uri, **self.dataset.dataset_options)
        for key in ("source", "id"):
            if key in ds.schema.names:
                try:
                    return f"row {index} ({key}={ds.take([index], columns=[key])[key][0].as_py()!r})"
                except (OSError, ValueError):
                    break
        return f"row {index}"


class LanceImageDataset(SafeLanceDataset):
    """``SafeLanceDataset`` whose batched read takes only ``columns``.

    ``__getitems__(indices)`` does one ``take`` of the listed columns and returns their rows as
    :class:`Rows` (a ``list[dict]``) in the order asked for, duplicates included; a decode error can still
    name the row's source file through ``Rows.describe``. ``columns=None`` reads every column, as
    ``SafeLanceDataset`` does. Opens lazily in each worker and pickles cheaply, like its parent.
    """

    def __init__(
        self,
        uri: str,
        *,
        columns: list[str] | tuple[str, ...] | None = ("image", "label"),
        dataset_options: dict | None = None,
    ):
        super().__init__(uri, dataset_options=dataset_options)
        self.columns = list(columns) if columns is not None else None

    def __getitems__(self, indices: list[int]) -> Rows:
        if self._ds is None:
            self._ds = lance.dataset(self.uri, **self.dataset_options)
        return Rows(self._ds.take(indices, columns=self.columns).to_pylist(), self, indices)


def open_dataset(
    uri: str | os.PathLike,
    *,
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
    columns: list[str] | tuple[str, ...] | None = None,
) -> LanceImageDataset:
    """:class:`LanceImageDataset` (a ``SafeLanceDataset``) over ``uri``, checked in the calling process.

    The dataset is opened here once (so a wrong path, or a column it lacks, fails now, naming the URI,
    instead of inside a worker) and then lazily in each worker. ``version`` pins the rows: indices are row
    positions of one version. ``storage_options`` (object-store credentials, endpoint) reach every worker
    through ``dataset_options``. ``columns`` limits what each batch reads (default: every column).
    """
    options = dataset_options(version, storage_options)
    ds = _open(uri, options)
    if columns is not None:
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise KeyError(
                f"Lance dataset at {os.fspath(uri)!r} has no column {', '.join(map(repr, missing))} "
                f"(it has {', '.join(ds.schema.names)})"
            )
    return LanceImageDataset(os.fspath(uri), columns=columns, dataset_options=options)


def label_names(uri: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> list[str]:
    """Class names stored by ``data_prep.convert`` in the schema metadata (``label_names``, a JSON list)."""
    ds = _open(uri, dataset_options(storage_options=storage_options))
    raw = (ds.schema.metadata or {}).get(b"label_names")
    return json.loads(raw) if raw else []
