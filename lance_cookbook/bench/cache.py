"""Page-cache eviction: the cold regime, where a dataset larger than memory is read from the disk.

``posix_fadvise(POSIX_FADV_DONTNEED)`` drops a file's clean cached pages and needs no privileges (unlike
``echo 3 > /proc/sys/vm/drop_caches``), so each loader's own files can be evicted before each timed epoch
without touching the rest of the machine. Pages still mapped by a process, or dirty, stay: ``os.sync()``
first writes back what a conversion just wrote.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["CAN_EVICT", "evict", "files_under"]

CAN_EVICT = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")  # not on macOS/Windows


def files_under(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Every regular file of ``paths`` (files as given, folders walked), sorted; missing paths are skipped."""
    found: set[str] = set()
    for path in paths:
        path = os.fspath(path)
        if os.path.isfile(path):
            found.add(os.path.abspath(path))
        elif os.path.isdir(path):
            for root, _, names in os.walk(path):
                found.update(os.path.abspath(os.path.join(root, n)) for n in names)
    return sorted(p for p in found if os.path.isfile(p))  # a symlink to nothing is not a file to evict


def evict(paths: Iterable[str | os.PathLike]) -> int:
    """Drop the page cache of every file under ``paths``; returns the number of files advised.

    Raises ``OSError`` where the platform has no ``posix_fadvise``: a "cold" figure measured warm would be
    a wrong figure, not a missing one.
    """
    if not CAN_EVICT:
        raise OSError("posix_fadvise is not available here: the cold regime cannot be measured")
    files = files_under(paths)
    os.sync()  # dirty pages cannot be dropped: write back what was just written first
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # offset 0, length 0: the whole file
        finally:
            os.close(fd)
    return len(files)
