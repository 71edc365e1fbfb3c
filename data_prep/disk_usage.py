"""Bytes on disk under a folder: what a dataset's files say they hold and what the file system allocates."""

from __future__ import annotations

import os

__all__ = ["dir_bytes"]


def dir_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """Sizes of every file under ``path``.

    Returns
    -------
    tuple of int
        (apparent bytes, allocated bytes). Allocated counts whole file-system blocks, so many small files
        occupy more than they hold (``docs/benchmark.md``, "Bytes on disk").
    """
    apparent = allocated = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += getattr(st, "st_blocks", st.st_size // 512) * 512
    return apparent, allocated
