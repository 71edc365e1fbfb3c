"""Open a Lance image dataset for PyTorch: ``SafeLanceDataset`` with a clear error for a bad URI."""

from __future__ import annotations

import json
import os
from typing import Any

import lance
from lance.torch.data import SafeLanceDataset

__all__ = ["open_dataset", "label_names", "dataset_options", "DatasetNotFound"]


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


def open_dataset(
    uri: str | os.PathLike,
    *,
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
) -> SafeLanceDataset:
    """``SafeLanceDataset`` over ``uri``, checked in the calling process.

    The dataset is opened here once (so a wrong path fails now, naming the URI, instead of inside a worker)
    and then lazily in each worker. ``version`` pins the rows: indices are row positions of one version.
    ``storage_options`` (object-store credentials, endpoint) reach every worker through ``dataset_options``.
    """
    options = dataset_options(version, storage_options)
    _open(uri, options)
    return SafeLanceDataset(os.fspath(uri), dataset_options=options)


def label_names(uri: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> list[str]:
    """Class names stored by ``data_prep.convert`` in the schema metadata (``label_names``, a JSON list)."""
    ds = _open(uri, dataset_options(storage_options=storage_options))
    raw = (ds.schema.metadata or {}).get(b"label_names")
    return json.loads(raw) if raw else []
