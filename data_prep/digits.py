"""The embedded default dataset: scikit-learn's UCI digits, converted to Lance once and reused."""

from __future__ import annotations

import os
from pathlib import Path

from lance_cookbook.data import default_data_dir

from .convert import convert

__all__ = ["ensure_digits"]


def ensure_digits(data_dir: str | os.PathLike | None = None, *, progress: bool = False) -> tuple[str, str]:
    """Return ``(train_uri, test_uri)`` of the digits in Lance under ``data_dir``, converting them first
    where missing.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Folder holding ``digits-train.lance`` and ``digits-test.lance`` (default:
        :func:`lance_cookbook.default_data_dir`, ``$LANCE_COOKBOOK_DATA`` or ``data/`` in the repository).
    progress : bool
        Show the conversion's progress bar.

    Returns
    -------
    tuple of str
        The two dataset URIs: 1,437 training and 360 held-out 8x8 digits stored as PNG (scikit-learn's
        ``load_digits``, no download).
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    uris = []
    for split in ("train", "test"):
        uri = root / f"digits-{split}.lance"
        if not (uri / "_versions").is_dir():
            convert("digits", uri, split=split, progress=progress)
        uris.append(str(uri))
    return uris[0], uris[1]
