"""The embedded default dataset: scikit-learn's UCI digits, converted to Lance once and reused."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ensure_digits", "default_data_dir"]


def default_data_dir() -> Path:
    """``$LANCE_COOKBOOK_DATA``, else ``data/`` at the repository root (next to ``notebooks/``)."""
    env = os.environ.get("LANCE_COOKBOOK_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def ensure_digits(data_dir: str | os.PathLike | None = None, *, progress: bool = False) -> tuple[str, str]:
    """Return ``(train_uri, test_uri)`` of the digits in Lance, converting them first if missing."""
    from data_prep.convert import convert

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    uris = []
    for split in ("train", "test"):
        uri = root / f"digits-{split}.lance"
        if not (uri / "_versions").is_dir():
            convert("digits", uri, split=split, progress=progress)
        uris.append(str(uri))
    return uris[0], uris[1]
