"""Open a Lance image dataset for PyTorch: ``SafeLanceDataset`` with a clear error for a bad URI."""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from typing import Any

import lance
import pyarrow as pa
from lance.torch.data import SafeLanceDataset

from .store_errors import silent_endpoint_reason, store_error_reason

__all__ = ["open_dataset", "LanceImageDataset", "Rows", "label_names", "stored_metadata", "dataset_options"]
__all__ += ["DatasetNotFound", "EmptyDataset", "latest_version"]


class DatasetNotFound(FileNotFoundError):
    """The URI does not hold a readable Lance dataset (or the requested version)."""


class EmptyDataset(ValueError):
    """A dataset with no rows where rows are needed (training or evaluation); the message names it."""


def dataset_options(version: int | str | None = None, storage_options: dict[str, str] | None = None) -> dict:
    """Return the ``lance.dataset`` keyword arguments that ``SafeLanceDataset`` hands to every worker."""
    options: dict[str, Any] = {} if version is None else {"version": version}
    if storage_options:
        options["storage_options"] = dict(storage_options)
    return options


def _open(uri: str | os.PathLike, options: dict) -> lance.LanceDataset:
    uri = os.fspath(uri)
    what = f"version {options['version']} of " if "version" in options else ""
    silent = silent_endpoint_reason(options.get("storage_options"))
    if silent:  # Lance's client would retry this for minutes
        raise DatasetNotFound(f"cannot open {what}Lance dataset at {uri!r}: {silent}")
    try:
        return lance.dataset(uri, **options)
    except (ValueError, OSError) as e:
        reason = store_error_reason(uri, e) or str(e).split(", /")[0]  # drop the Rust source locations
        raise DatasetNotFound(f"cannot open {what}Lance dataset at {uri!r}: {reason}") from None


class Rows(list):
    """The rows (``list[dict]``) of one batched read; ``indices[i]`` is the dataset position of row ``i``."""

    def __init__(self, rows: list[dict[str, Any]], dataset: LanceImageDataset, indices: list[int]):
        super().__init__(rows)
        self.dataset = dataset
        self.indices = list(indices)

    def __reduce__(self):
        return (list, (list(self),))  # a plain list: no dataset handle rides along to another process

    def describe(self, position: int) -> str:
        """Name the row at ``position``: its index and its ``source`` or ``id`` column if it has one."""
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
    """``SafeLanceDataset`` whose batched read takes only ``columns`` (None: all) and indexes like a list.

    ``__getitems__`` does one ``take`` and returns :class:`Rows` in the order asked, duplicates included.
    An index outside ``[-len, len)`` raises ``IndexError`` naming the URI; a non-integer, ``TypeError``.
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

    @property
    def version(self) -> int | str | None:
        """The version every worker reads (``open_dataset`` always pins one)."""
        return self.dataset_options.get("version")

    def _position(self, index: Any) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"dataset indices must be integers, not {type(index).__name__}") from None
        n = self._len
        if not -n <= i < n:
            at = f" version {self.version}" if self.version is not None else ""
            raise IndexError(f"index {i} is out of range for {n} rows of {self.uri!r}{at}")
        return i + n if i < 0 else i

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Rows:
        positions = [self._position(i) for i in indices]
        if self._ds is None:
            self._ds = lance.dataset(self.uri, **self.dataset_options)
        return Rows(self._ds.take(positions, columns=self.columns).to_pylist(), self, positions)


def open_dataset(
    uri: str | os.PathLike,
    *,
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
    columns: list[str] | tuple[str, ...] | None = None,
) -> LanceImageDataset:
    """Open ``uri`` as a :class:`LanceImageDataset`: checked here, then opened lazily in each worker.

    Parameters
    ----------
    uri : str or os.PathLike
        Local path or object-store URI (``s3://bucket/prefix.lance``).
    version : int or str, optional
        Default: the latest *at this call*, pinned, so every worker reads the rows ``len()`` counted.
    storage_options : dict, optional
        Object-store credentials and endpoint; they reach every worker.
    columns : list of str, optional
        What each batch reads (default: every column).

    Returns
    -------
    LanceImageDataset
        Its ``version`` attribute is the pinned version.

    Raises
    ------
    DatasetNotFound
        No readable Lance dataset (or no such version) at ``uri``.
    KeyError
        A column the dataset lacks; the message lists those it has.
    """
    options = dataset_options(version, storage_options)
    ds = _open(uri, options)
    options["version"] = ds.version  # pin what was opened (lance-spark#344: "latest" differs per worker)
    if columns is not None:
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise KeyError(
                f"Lance dataset at {os.fspath(uri)!r} has no column {', '.join(map(repr, missing))} "
                f"(it has {', '.join(ds.schema.names)})"
            )
    return LanceImageDataset(os.fspath(uri), columns=columns, dataset_options=options)


def latest_version(uri: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> int:
    """Return the newest version number of the dataset at ``uri``; raises :class:`DatasetNotFound`."""
    return _open(uri, dataset_options(storage_options=storage_options)).version


def stored_metadata(schema: pa.Schema, field: str, key: bytes) -> bytes | None:
    """Return ``key`` from the metadata of ``field``, else of the schema (older datasets); ``None`` if absent.

    Schema-level metadata makes LanceDB's loaders panic (docs/lance_loaders.md; ``data_prep.migrate``).
    """
    on_field = schema.field(field).metadata if field in schema.names else None
    return (on_field or {}).get(key) or (schema.metadata or {}).get(key)


def label_names(
    uri: str | os.PathLike, *, version: int | str | None = None, storage_options: dict[str, str] | None = None
) -> list[str]:
    """Return the class names stored by the conversion (``label`` field's ``label_names``); ``[]`` if none.

    Raises :class:`DatasetNotFound`, or ``json.JSONDecodeError`` when the stored value is not JSON.
    """
    ds = _open(uri, dataset_options(version, storage_options))
    raw = stored_metadata(ds.schema, "label", b"label_names")
    return json.loads(raw) if raw else []
