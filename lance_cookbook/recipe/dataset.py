"""Open a Lance image dataset for PyTorch: ``SafeLanceDataset`` over the rows of one pinned version.

A version is a number or a tag; a SQL ``filter`` selects rows, and each worker reads exactly those rows.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from typing import Any

import lance
import numpy as np
import pyarrow as pa
from lance.torch.data import SafeLanceDataset
from torch.utils.data import get_worker_info

from .readahead import ReadAhead
from .store_errors import silent_endpoint_reason, store_error_reason

__all__ = ["open_dataset", "LanceImageDataset", "Rows", "label_names", "stored_metadata", "dataset_options"]
__all__ += ["DatasetNotFound", "EmptyDataset", "InvalidFilter", "latest_version", "resolve_version"]


class DatasetNotFound(FileNotFoundError):
    """The URI does not hold a readable Lance dataset (or the requested version)."""


class EmptyDataset(ValueError):
    """A dataset with no rows where rows are needed (training or evaluation); the message names it."""


class InvalidFilter(ValueError):
    """A filter that is not a Lance SQL predicate over the dataset's columns; the message names both."""


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


def _runs(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` as ``"1-3, 5"``."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _checkout(uri: str, version: int | str | None, storage_options: dict | None) -> lance.LanceDataset:
    """Open ``uri`` at ``version``: a number, a tag (any ``str``, as in Lance) or ``None`` (the latest)."""
    latest = _open(uri, dataset_options(None, storage_options))
    if version is None:
        return latest
    tags = latest.tags.list()
    if isinstance(version, str) and version not in tags:
        listed = ", ".join(f"{name} (version {t['version']})" for name, t in sorted(tags.items()))
        raise DatasetNotFound(
            f"Lance dataset at {uri!r} has no tag {version!r} (its tags: {listed or 'none'}): pass one of "
            "them or a version number"
        )
    try:
        return latest.checkout_version(version)
    except (ValueError, OSError):
        exist = _runs([v["version"] for v in latest.versions()])
        raise DatasetNotFound(
            f"Lance dataset at {uri!r} has no version {version} (versions that exist: {exist}; "
            "cleanup_old_versions removes untagged ones): pass one of them"
        ) from None


def _matching_rows(ds: lance.LanceDataset, filter: str, uri: str, named: str) -> np.ndarray:
    """Positions in ``ds``'s version of the rows matching ``filter``, in table order.

    One scan of the meta column ``_rowoffset`` (the ``take`` index) with the predicate pushed down: only the
    columns the predicate names are read, never the images.
    """
    try:
        table = ds.to_table(columns=["_rowoffset"], filter=filter)
    except (ValueError, OSError) as e:
        reason = str(e).split(", /")[0].replace("Invalid user input: ", "").split(". Valid fields")[0]
        raise InvalidFilter(
            f"filter {filter!r} is not a valid Lance SQL predicate for {uri!r}: {reason} (its columns: "
            f"{', '.join(ds.schema.names)}; quote strings with '...')"
        ) from None
    if table.num_rows == 0:
        raise EmptyDataset(
            f"filter {filter!r} matches none of the {ds.count_rows()} rows of {named} of {uri!r}: check the "
            "predicate's values, or the version"
        )
    return table.column("_rowoffset").to_numpy().astype(np.int64)


class Rows(list):
    """The rows (``list[dict]``) of one batched read; ``indices[i]`` is row ``i``'s position in the version.

    That position is the dataset index too unless the dataset is filtered.
    """

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
    ``rows`` (positions in the pinned version, which ``dataset_options`` must then give as a number): index
    ``i`` reads row ``rows[i]``; they travel to the workers with the dataset (8 bytes a row). ``None``: all
    rows. ``filter`` and ``tag`` are recorded (``open_dataset`` sets them) for messages and checkpoints.
    In a worker, a batch that announces the worker's next ones (:mod:`.readahead`) has them read ahead.
    """

    reads_ahead = True  # make_loader's read_ahead works with it

    def __init__(
        self,
        uri: str,
        *,
        columns: list[str] | tuple[str, ...] | None = ("image", "label"),
        dataset_options: dict | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        filter: str | None = None,
        tag: str | None = None,
    ):
        if rows is not None and not isinstance((dataset_options or {}).get("version"), (int, np.integer)):
            raise ValueError("rows are positions in one version: pin it, dataset_options={'version': N}")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.filter, self.tag = filter, tag
        super().__init__(uri, dataset_options=dataset_options)
        self.columns = list(columns) if columns is not None else None
        self._read_ahead: ReadAhead | None = None

    def _safe_preload(self) -> int:
        return super()._safe_preload() if self.rows is None else len(self.rows)

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
        ahead = getattr(indices, "ahead", None)  # a HintedBatch: make_loader's read-ahead (readahead.py)
        # its threads live in workers only; a worker's first batch opens the dataset, before any thread
        if ahead is None or get_worker_info() is None or self._ds is None:
            return self._read([indices])[0]
        if self._read_ahead is None:
            self._read_ahead = ReadAhead(self._read)
        return self._read_ahead(indices)

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "_read_ahead": None}

    def _open(self) -> lance.LanceDataset:
        if self._ds is None:
            self._ds = lance.dataset(self.uri, **self.dataset_options)
        return self._ds

    def _read(self, batches: list[Sequence[int]]) -> list[Rows]:
        """Read ``batches`` (lists of indices) with one ``take``; return their :class:`Rows`."""
        positions = [[self._position(i) for i in indices] for indices in batches]
        if self.rows is not None:
            positions = [self.rows[p].tolist() for p in positions]
        try:
            table = self._open().take([p for part in positions for p in part], columns=self.columns)
        except (ValueError, OSError) as e:
            if "not found" not in str(e).lower():
                raise
            tagged = f" (tag {self.tag!r})" if self.tag else ""
            raise DatasetNotFound(
                f"version {self.version}{tagged} of Lance dataset at {self.uri!r} is gone "
                "(cleanup_old_versions removed it, or its files, while this run read it): keep a tag on "
                "every version a run reads, and delete the tag only after the run"
            ) from None
        rows, at = table.to_pylist(), 0
        out = []
        for part in positions:
            out.append(Rows(rows[at : at + len(part)], self, part))
            at += len(part)
        return out


def open_dataset(
    uri: str | os.PathLike,
    *,
    filter: str | None = None,
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
    columns: list[str] | tuple[str, ...] | None = None,
) -> LanceImageDataset:
    """Open ``uri`` as a :class:`LanceImageDataset`: checked here, then opened lazily in each worker.

    Parameters
    ----------
    uri : str or os.PathLike
        Local path or object-store URI (``s3://bucket/prefix.lance``).
    filter : str, optional
        A Lance SQL predicate (``"label < 5 AND split = 'train'"``; NULL does not match): the dataset then
        holds the matching rows only, in table order (``ds[i]`` is the ``i``-th match). Evaluated once, here,
        without reading the images. Default: every row.
    version : int or str, optional
        A version number or a tag (any ``str``), resolved here to its number, which every worker reads: moving
        the tag later changes nothing. Default: the latest *at this call*, pinned, so every worker reads the
        rows ``len()`` counted.
    storage_options : dict, optional
        Object-store credentials and endpoint; they reach every worker.
    columns : list of str, optional
        What each batch reads (default: every column).

    Returns
    -------
    LanceImageDataset
        ``version`` is the pinned number, ``tag`` the tag given (else ``None``), ``filter`` the predicate and
        ``rows`` the matching positions (``None`` without a filter).

    Raises
    ------
    DatasetNotFound
        No readable Lance dataset at ``uri``; no such tag (the message lists the tags) or version number
        (it lists those that exist).
    InvalidFilter
        ``filter`` does not parse, names a column the dataset lacks, or compares with the wrong type.
    EmptyDataset
        ``filter`` matches no row of the version.
    KeyError
        A column the dataset lacks; the message lists those it has.
    """
    uri = os.fspath(uri)
    ds = _checkout(uri, version, storage_options)
    if columns is not None:
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise KeyError(
                f"Lance dataset at {uri!r} has no column {', '.join(map(repr, missing))} "
                f"(it has {', '.join(ds.schema.names)})"
            )
    tag = version if isinstance(version, str) else None
    named = f"version {ds.version}" + (f" (tag {tag!r})" if tag else "")
    rows = None if filter is None else _matching_rows(ds, filter, uri, named)
    # pin the number opened (lance-spark#344: "latest" differs per worker; a tag can move)
    options = dataset_options(ds.version, storage_options)
    return LanceImageDataset(uri, columns=columns, dataset_options=options, rows=rows, filter=filter, tag=tag)


def resolve_version(
    uri: str | os.PathLike, version: int | str | None = None, *, storage_options: dict[str, str] | None = None
) -> int:
    """Return the number of ``version`` (a number, a tag, ``None``: the latest) at ``uri``, checked to exist.

    Raises :class:`DatasetNotFound`, naming the tags or versions there are.
    """
    return _checkout(os.fspath(uri), version, storage_options).version


def latest_version(uri: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> int:
    """Return the newest version number of the dataset at ``uri``; raises :class:`DatasetNotFound`."""
    return resolve_version(uri, storage_options=storage_options)


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
