"""Training checkpoints.

Atomic writes to a local folder or an ``s3://`` prefix, the newest loadable one found again, older ones
pruned.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "checkpoint_name",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "remote_filesystem",
    "save_checkpoint",
    "state_sha256",
    "write_atomically",
]

_NAME = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")

# What torch.load(weights_only=True) must also accept to read checkpoints written before commit f32d649,
# which stored NumPy's RNG keys as a uint32 array (t3-ckpt-unreadable-restart): the array's reconstruction
# and dtype, nothing callable beyond that. Files pickled under NumPy 1 name the function by its old module.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct
NUMPY_RNG_GLOBALS = [
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]

# the storage options of Lance (lance.dataset(storage_options=...)) that pyarrow's S3FileSystem takes, by name
_S3_OPTIONS = {
    "access_key": ("aws_access_key_id", "access_key_id"),
    "secret_key": ("aws_secret_access_key", "secret_access_key"),
    "session_token": ("aws_session_token", "session_token", "token"),
    "region": ("aws_region", "region"),
    "endpoint_override": ("aws_endpoint", "aws_endpoint_url", "endpoint", "endpoint_url"),
}


class CheckpointError(RuntimeError):
    """Checkpoints that exist but cannot be resumed from, or a checkpoint location that cannot be used.

    The message names the files or the location and says why.
    """


def remote_filesystem(location: str | os.PathLike, storage_options: dict[str, str] | None = None):
    """``(pyarrow.fs.S3FileSystem, "bucket/key")`` for an ``s3://`` URI, ``None`` for a local path.

    The filesystem gets the credentials, region and endpoint of ``storage_options`` (Lance's names:
    ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``aws_region``,
    ``aws_endpoint``; an ``http://`` endpoint is spoken to over plain HTTP); options it lacks are left to
    AWS's usual lookup (environment, profile, instance role), as Lance does. Other options (Lance's own
    tuning) are not used here.

    Raises
    ------
    CheckpointError
        Another URI scheme (``gs://``, ``az://``, ``file://`` ...): only local paths and ``s3://`` are
        supported. A ``Path`` built from a URI (``Path("s3://b/k")`` is ``s3:/b/k``: syne-tune#232) is
        caught too, because it would silently write to a local folder named ``s3:``.
    """
    text = os.fspath(location)
    scheme, sep, rest = text.partition("://")
    if not sep:
        mangled = re.match(r"^([a-z][a-z0-9+.-]*):/[^/]", text)
        if mangled and not os.path.exists(mangled.group(1) + ":"):
            raise CheckpointError(
                f"{text!r} looks like a URI that lost a slash ({mangled.group(1)}://...): pass the URI as a "
                "string, not through pathlib.Path"
            )
        return None
    if scheme != "s3":
        raise CheckpointError(
            f"cannot write to {text!r}: checkpoints and metrics go to a local path or an s3:// URI, not "
            f"{scheme}://"
        )
    from pyarrow import fs

    options = storage_options or {}
    kwargs = {arg: options[k] for arg, keys in _S3_OPTIONS.items() for k in keys if k in options}
    endpoint = kwargs.get("endpoint_override", "")
    if endpoint.startswith("http://"):
        kwargs["scheme"] = "http"
    return fs.S3FileSystem(**kwargs), rest.rstrip("/")


def check_location(location: str | os.PathLike, storage_options: dict[str, str] | None = None) -> None:
    """Raise :class:`CheckpointError` before training if checkpoints or metrics cannot go to ``location``.

    Raised now, before training, for an unsupported URI scheme, or an ``s3://`` bucket that does not exist or
    cannot be reached with ``storage_options``. A local path is always accepted (its folders are created).
    """
    remote = remote_filesystem(location, storage_options)
    if remote is None:
        return
    from pyarrow import fs

    filesystem, path = remote
    bucket = path.split("/", 1)[0]
    try:
        missing = filesystem.get_file_info(bucket).type == fs.FileType.NotFound
    except OSError as e:
        raise CheckpointError(f"cannot reach {os.fspath(location)!r}: {e}") from None
    if missing:
        raise CheckpointError(f"cannot write to {os.fspath(location)!r}: bucket {bucket!r} does not exist")


def _join(directory: str | os.PathLike, name: str) -> str | Path:
    text = os.fspath(directory)
    return f"{text.rstrip('/')}/{name}" if "://" in text else Path(directory) / name


def _order(path: str | os.PathLike) -> tuple[int, int]:
    m = _NAME.match(os.path.basename(os.fspath(path)))
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def checkpoint_name(epoch: int, consumed: int) -> str:
    """``checkpoint-e{epoch}-s{consumed}.pt``, zero-padded so names sort in training order.

    An epoch's end is saved as the start of the next one (``epoch + 1``, ``consumed=0``).
    """
    return f"checkpoint-e{epoch:05d}-s{consumed:012d}.pt"


def list_checkpoints(
    directory: str | os.PathLike, *, storage_options: dict[str, str] | None = None
) -> list[Path] | list[str]:
    """The checkpoints in ``directory``, newest (furthest in training) first.

    ``directory`` is a local folder (``Path`` items) or an ``s3://`` prefix (URI strings). Temporary files are
    not listed. A missing directory has none.
    """
    remote = remote_filesystem(directory, storage_options)
    if remote is not None:
        from pyarrow import fs

        filesystem, prefix = remote
        infos = filesystem.get_file_info(fs.FileSelector(prefix, allow_not_found=True))
        found = [_join(directory, info.base_name) for info in infos if _NAME.match(info.base_name)]
    else:
        directory = Path(directory)
        found = [p for p in directory.iterdir() if _NAME.match(p.name)] if directory.is_dir() else []
    return sorted(found, key=_order, reverse=True)


def write_atomically(
    location: str | os.PathLike,
    write: Callable[[BinaryIO], Any],
    *,
    storage_options: dict[str, str] | None = None,
) -> None:
    """Call ``write(file)`` to fill ``location`` atomically.

    Readers see the whole file or the previous one, never half of one.

    Local: written under a temporary name in the same folder (created if missing), flushed to disk and
    renamed (``os.replace`` is atomic on POSIX file systems); the temporary file is removed on any
    failure. ``s3://``: written to memory, then one upload (an object appears whole or not at all).

    Raises
    ------
    CheckpointError
        An unsupported URI (:func:`remote_filesystem`). Errors of the file system or the store pass through.
    """
    remote = remote_filesystem(location, storage_options)
    if remote is not None:
        filesystem, path = remote
        buffer = io.BytesIO()
        write(buffer)
        with filesystem.open_output_stream(path) as out:
            out.write(buffer.getbuffer())
        return
    location = Path(location)
    location.parent.mkdir(parents=True, exist_ok=True)
    tmp = location.with_name(f".{location.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, location)
    finally:
        tmp.unlink(missing_ok=True)


def _delete(path: str | Path, storage_options: dict[str, str] | None) -> None:
    remote = remote_filesystem(path, storage_options)
    if remote is None:
        Path(path).unlink(missing_ok=True)
    else:
        filesystem, key = remote
        filesystem.delete_file(key)


def save_checkpoint(
    state: dict[str, Any],
    directory: str | os.PathLike,
    name: str,
    *,
    keep: int = 2,
    storage_options: dict[str, str] | None = None,
) -> Path | str:
    """Write ``state`` with ``torch.save`` to ``directory/name`` atomically, then prune old checkpoints.

    The write goes through :func:`write_atomically`; then only the ``keep`` newest checkpoints up to this one
    are kept.

    A crash mid-write leaves a temporary file that :func:`list_checkpoints` ignores, never a truncated
    checkpoint under a checkpoint's name. Keeping one older checkpoint covers a newest one damaged after the
    fact (a copy cut short, a disk fault): :func:`load_latest` falls back to it. Checkpoints that sort
    *after* this one are never pruned: they are ones this run could not load (it resumed from an older
    one), and deleting the new one because they sort later lost every new checkpoint
    (t3-ckpt-unreadable-restart).

    Parameters
    ----------
    state : dict
        Anything ``torch.save`` takes.
    directory : str or os.PathLike
        A local folder (created if missing) or an ``s3://`` prefix.
    name : str
        From :func:`checkpoint_name`.
    keep : int
        How many checkpoints to keep, this one included (at least 1).
    storage_options : dict, optional
        For an ``s3://`` directory (:func:`remote_filesystem`).

    Returns
    -------
    Path or str
        The checkpoint written (a URI string for ``s3://``).
    """
    path = _join(directory, name)
    write_atomically(path, lambda f: torch.save(state, f), storage_options=storage_options)
    listed = list_checkpoints(directory, storage_options=storage_options)
    older = [p for p in listed if _order(p) < _order(path)]
    for old in older[max(1, keep) - 1 :]:
        _delete(old, storage_options)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a local or ``s3://`` checkpoint, never arbitrary pickles.

    Also accepts the NumPy array that checkpoints written before commit f32d649 hold (``NUMPY_RNG_GLOBALS``).

    Raises
    ------
    CheckpointError
        The file loads but is not a training checkpoint (a dict with ``"model"``).
    Exception
        What ``torch.load`` raises for a damaged file (``RuntimeError``, ``EOFError``, ``UnpicklingError``).
    """
    remote = remote_filesystem(path, storage_options)
    if remote is None:
        source: Any = path
    else:
        filesystem, key = remote
        with filesystem.open_input_stream(key) as f:
            source = io.BytesIO(f.read())
    with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
        state = torch.load(source, map_location=map_location, weights_only=True)
    if not (isinstance(state, dict) and "model" in state):
        raise CheckpointError(f"{os.fspath(path)} is not a training checkpoint (no 'model' entry)")
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # torch's weights_only refusal is a page of advice; its cause is on the line naming the global
    cause = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = cause.group(1) if cause else (text.splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:300]}"


def load_latest(
    directory: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    storage_options: dict[str, str] | None = None,
) -> tuple[Path | str, dict[str, Any]] | tuple[None, None]:
    """Load the newest checkpoint in ``directory`` that reads completely.

    A checkpoint that fails to load (cut off, corrupted) is skipped with a warning naming it, and the
    next older one is tried.

    Returns
    -------
    tuple
        ``(path, state)``, or ``(None, None)`` when ``directory`` holds no checkpoint at all.

    Raises
    ------
    CheckpointError
        ``directory`` holds checkpoints and none of them loads: the message names each with its error.
        Training from scratch over them would silently redo the finished epochs, overwrite the metrics and
        prune the files (t3-ckpt-unreadable-restart; TTS-Audio-Suite#288).
    """
    failures = []
    for path in list_checkpoints(directory, storage_options=storage_options):
        try:
            return path, load_checkpoint(path, map_location=map_location, storage_options=storage_options)
        except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError... on damage
            failures.append(f"{os.path.basename(os.fspath(path))} ({_first_line(e)})")
            warnings.warn(f"skipping unreadable checkpoint {path}: {_first_line(e)}", stacklevel=2)
    if failures:
        raise CheckpointError(
            f"no checkpoint in {os.fspath(directory)} can be loaded, so the run cannot resume: "
            f"{'; '.join(failures)}. Move them away (or use another --checkpoint-dir) to train from scratch"
        )
    return None, None


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (names, dtypes, shapes and bytes): equal for identical weights."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
