"""The embedded default dataset: scikit-learn's UCI digits, converted to Lance once and reused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lance_cookbook.data import default_data_dir

from .check import ConversionError
from .convert import convert

__all__ = ["ensure_digits"]

LOCK_NAME = ".digits.lock"  # beside the datasets: held while one process converts them


def ensure_digits(data_dir: str | os.PathLike | None = None, *, progress: bool = False) -> tuple[str, str]:
    """Return ``(train_uri, test_uri)`` of the digits in Lance under ``data_dir``.

    The digits are converted first where missing.

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

    Safe to call from several processes at once on one folder (chapters run side by side): one converts
    while the others wait on a lock file in ``data_dir`` (``.digits.lock``, kept), then use its datasets
    (the t3-nb-parallel-first-run report).

    Raises
    ------
    data_prep.check.ConversionError
        The conversion failed (nothing partial is left in ``data_dir``).
    OSError
        ``data_dir`` cannot be created or the lock file cannot be opened there.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    uris = [root / f"digits-{split}.lance" for split in ("train", "test")]
    if not all(_complete(uri) for uri in uris):
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / LOCK_NAME):
            for split, uri in zip(("train", "test"), uris, strict=True):
                # Checked again under the lock: another process may have converted it while we waited
                if not _complete(uri):
                    try:
                        convert("digits", uri, split=split, progress=progress)
                    except ConversionError:
                        # A process that holds no lock (no fcntl, a file system without flock) finished
                        # the same dataset first: the digits are the digits, use its copy
                        if not _complete(uri):
                            raise
    return str(uris[0]), str(uris[1])


def _complete(uri: Path) -> bool:
    # A conversion renames its dataset into place only once committed (data_prep.write), so a dataset
    # folder with a version is a whole one
    return (uri / "_versions").is_dir()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the block.

    Every chapter's first cell calls :func:`ensure_digits` on the same folder, and several run at once on a
    fresh checkout (``make -j``, two notebooks side by side, ``pytest -n``): without the lock each converts,
    and all but the first fail to rename their staging folder into place (pytorch/tutorials#3065, the
    t3-nb-parallel-first-run report). The kernel releases the lock when its holder dies, so a killed
    conversion never blocks the next. Where ``fcntl`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
