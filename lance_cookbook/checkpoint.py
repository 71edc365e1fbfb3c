"""Training checkpoints on disk: atomic writes, the newest complete one found again, older ones pruned."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["checkpoint_name", "list_checkpoints", "save_checkpoint", "load_latest", "state_sha256"]

_NAME = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


def checkpoint_name(epoch: int, consumed: int) -> str:
    """``checkpoint-e{epoch}-s{consumed}.pt``, zero-padded so names sort in training order.

    An epoch's end is saved as the start of the next one (``epoch + 1``, ``consumed=0``).
    """
    return f"checkpoint-e{epoch:05d}-s{consumed:012d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``directory``, newest (furthest in training) first; temporary files are not
    listed. A missing directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), path))
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, name: str, *, keep: int = 2) -> Path:
    """Write ``state`` with ``torch.save`` to ``directory/name`` atomically, then keep only the ``keep``
    newest checkpoints.

    The file is written under a temporary name, flushed to disk and renamed (``os.replace`` is atomic on
    POSIX file systems): a crash mid-write leaves a temporary file that :func:`list_checkpoints` ignores,
    never a truncated checkpoint under a checkpoint's name. Keeping one older checkpoint covers a newest
    one damaged after the fact (a copy cut short, a disk fault): :func:`load_latest` falls back to it.

    Parameters
    ----------
    state : dict
        Anything ``torch.save`` takes.
    directory : str or os.PathLike
        Created if missing.
    name : str
        From :func:`checkpoint_name`.
    keep : int
        How many checkpoints to keep, this one included (at least 1).

    Returns
    -------
    Path
        The checkpoint written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[max(1, keep) :]:
        old.unlink(missing_ok=True)
    return path


def load_latest(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """Load the newest checkpoint in ``directory`` that reads completely.

    A checkpoint that fails to load (cut off, corrupted) is skipped with a warning naming it, and the
    next older one is tried.

    Returns
    -------
    tuple
        ``(path, state)``, or ``(None, None)`` when there is no readable checkpoint.
    """
    for path in list_checkpoints(directory):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError... on damage
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if isinstance(state, dict) and "model" in state:
            return path, state
        warnings.warn(f"skipping {path}: not a training checkpoint", stacklevel=2)
    return None, None


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (names, dtypes, shapes and bytes): equal for identical weights."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
