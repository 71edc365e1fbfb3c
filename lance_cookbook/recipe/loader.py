"""The recommended DataLoader over Lance: batched reads, forkserver workers, decoding (docs/training.md)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.multiprocessing
from torch.utils.data import DataLoader, Dataset, Sampler

from .collate import ImageCollate
from .dataset import open_dataset
from .readahead import REMOTE_READ_AHEAD, ReadAheadBatchSampler
from .start_method import LOADER_PRELOAD, check_start_method, end_with_process, lance_safe_context

__all__ = ["make_loader", "default_workers", "check_start_method", "ReentrantDataLoader", "WorkerInit"]
__all__ += ["is_remote"]


def default_workers() -> int:
    """Return one worker per available core, at most 8 (decode is CPU-bound)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class WorkerInit:
    """``worker_init_fn`` of :func:`make_loader`'s workers; then calls the caller's ``worker_init_fn``.

    A worker ends with the process that started it, uses its sharing strategy (read when pickled, as the
    workers start) and ignores SIGINT; why: docs/training.md, "Why the recipe does X".
    """

    def __init__(self, worker_init_fn: Callable[[int], Any] | None = None):
        self.worker_init_fn = worker_init_fn
        self.owner_pid = os.getpid()
        self.sharing_strategy = torch.multiprocessing.get_sharing_strategy()

    def __getstate__(self) -> dict[str, Any]:
        strategy = torch.multiprocessing.get_sharing_strategy()
        return {**vars(self), "owner_pid": os.getpid(), "sharing_strategy": strategy}

    def __call__(self, worker_id: int) -> None:
        """Run in worker ``worker_id`` as it starts."""
        end_with_process(self.owner_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.multiprocessing.set_sharing_strategy(self.sharing_strategy)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def is_remote(uri: str | os.PathLike) -> bool:
    """Return whether ``uri`` names object storage (``s3://``, ``gs://``, ``az://`` ...), not a local path."""
    scheme = urlsplit(os.fspath(uri)).scheme
    return len(scheme) > 1 and scheme != "file"  # "C:" is a Windows drive


class ReentrantDataLoader(DataLoader):
    """A ``DataLoader`` whose persistent workers never serve two passes at once (torchrec#2327).

    A second pass started while one runs (until exhausted or dropped) gets short-lived workers of its own.
    ``read_ahead``: batches each worker reads ahead (:mod:`.readahead`; 0: none), with workers only.
    """

    def __init__(self, *args: Any, read_ahead: int = 0, **kwargs: Any):
        self.read_ahead = read_ahead  # before DataLoader's __init__, which may ask for _index_sampler
        super().__init__(*args, **kwargs)
        self._arguments = (args, {**kwargs, "read_ahead": read_ahead})
        self._pass_running = False

    @property
    def _index_sampler(self):
        # DataLoader's iterators draw batches from here: the batch sampler, announcing each worker's next
        index_sampler = super()._index_sampler
        if self.read_ahead > 0 and self.num_workers > 0 and self._auto_collation:
            return ReadAheadBatchSampler(index_sampler, self.read_ahead, self.num_workers)
        return index_sampler

    def __iter__(self):
        if not (self.persistent_workers and self.num_workers > 0):
            return super().__iter__()
        if self._pass_running:
            args, kwargs = self._arguments
            return iter(ReentrantDataLoader(*args, **{**kwargs, "persistent_workers": False}))
        return _Pass(self, super().__iter__())


class _Pass:
    """One pass over the persistent workers; marks the loader busy until exhausted or dropped."""

    def __init__(self, loader: ReentrantDataLoader, iterator: Any):
        self._loader, self._iterator = loader, iterator
        loader._pass_running = True

    def __iter__(self) -> _Pass:
        return self

    def __len__(self) -> int:
        return len(self._iterator)

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        if self._loader is not None:
            self._loader._pass_running = False
            self._loader = None

    __del__ = _end


def make_loader(
    uri_or_dataset: str | os.PathLike | Dataset,
    *,
    batch_size: int | None = 32,
    num_workers: int | None = None,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    collate_fn: Any = None,
    pin_memory: bool | None = None,
    filter: str | None = None,
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
    columns: list[str] | tuple[str, ...] | None | str = "auto",
    multiprocessing_context: str | Any | None = None,
    persistent_workers: bool | None = None,
    read_ahead: int | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """Build the recommended ``DataLoader`` over a Lance dataset: one ``take`` a batch, decode in the workers.

    Parameters
    ----------
    uri_or_dataset : str, os.PathLike or Dataset
        A Lance URI, opened here first (a wrong path fails now, naming it), or a dataset.
    batch_size, shuffle, sampler : optional
        As ``DataLoader``'s (``batch_size=None``: one row per item); ``DistributedSampler`` or
        ``BlockShuffleSampler`` (``set_epoch`` every epoch), ``ShardSampler`` for evaluation.
    num_workers, pin_memory : optional
        Default :func:`default_workers` (0: read in this process) and ``torch.cuda.is_available()``.
    collate_fn : callable, optional
        Default ``ImageCollate(224, decoder="torchvision", dtype=torch.uint8)``; finish with ``to_device``.
    filter, version, storage_options, columns : optional
        With a URI: :func:`.open_dataset`'s SQL ``filter``, the version (number or tag) every worker reads
        (default the latest, pinned now), the store's options, the columns each batch reads (``"auto"``: the
        collate's ``columns``, else all; ``None``: all).
    multiprocessing_context, persistent_workers : optional
        Default forkserver (spawn where missing; ``"fork"`` is refused, lance#3640) and ``True``.
    read_ahead : int, optional
        Batches each worker reads ahead in the background, several to one ``take`` (:mod:`.readahead`), and
        holds as encoded bytes. Default: 16 (``REMOTE_READ_AHEAD``) from object storage (an ``s3://``-like
        URI, or a dataset opened from one), 0 on local disk; figures: docs/object_storage_traffic.md.
    **dataloader_kwargs
        Passed to ``DataLoader`` (``timeout``, ``drop_last``, ``worker_init_fn`` ...).

    Returns
    -------
    ReentrantDataLoader
        A second pass started while one runs gets workers of its own.

    Raises
    ------
    DatasetNotFound, KeyError, TypeError
        No readable dataset (or version) at the URI; a column it lacks; ``columns`` not a list of names.
    ValueError
        ``filter``, ``version``, ``storage_options`` or ``columns`` with a dataset; ``shuffle`` with a
        sampler; ``num_workers < 0``; ``persistent_workers`` or ``read_ahead`` without workers; the ``fork``
        start method; ``read_ahead < 0``.
    """
    if collate_fn is None:
        collate_fn = ImageCollate(224, decoder="torchvision", dtype=torch.uint8)
    dataset = _dataset(uri_or_dataset, filter, version, storage_options, columns, collate_fn)
    num_workers = _workers(num_workers, sampler, shuffle, persistent_workers)
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    if num_workers > 0:
        context = multiprocessing_context
        safe = lance_safe_context(LOADER_PRELOAD) if context is None else check_start_method(context)
        kwargs["multiprocessing_context"] = safe
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kwargs["worker_init_fn"] = WorkerInit(dataloader_kwargs.pop("worker_init_fn", None))
    read_ahead = _read_ahead(read_ahead, dataset, num_workers)
    return ReentrantDataLoader(dataset, read_ahead=read_ahead, **{**kwargs, **dataloader_kwargs})


def _workers(num_workers: int | None, sampler: Any, shuffle: bool, persistent_workers: bool | None) -> int:
    """``num_workers`` checked against the other arguments, or its default (:func:`default_workers`)."""
    if sampler is not None and shuffle:
        raise ValueError("shuffle=True conflicts with a sampler: the sampler decides the order")
    num_workers = default_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if persistent_workers and num_workers == 0:
        raise ValueError("persistent_workers=True needs num_workers > 0")
    return num_workers


def _read_ahead(read_ahead: int | None, dataset: Any, num_workers: int) -> int:
    """``read_ahead`` checked, or its default: :data:`REMOTE_READ_AHEAD` for a dataset in object storage."""
    if read_ahead is None:
        remote = getattr(dataset, "reads_ahead", False) and is_remote(getattr(dataset, "uri", ""))
        return REMOTE_READ_AHEAD if remote and num_workers > 0 else 0
    if read_ahead < 0:
        raise ValueError(f"read_ahead must be >= 0 batches, got {read_ahead}")
    if read_ahead and num_workers == 0:
        raise ValueError("read_ahead needs num_workers > 0: the workers read ahead")
    return read_ahead


def _dataset(source: Any, filter: Any, version: Any, options: Any, columns: Any, collate_fn: Any) -> Dataset:
    """Open a URI with ``filter``, ``version``, storage ``options`` and ``columns``; refuse them otherwise."""
    if not isinstance(source, (str, os.PathLike)):
        if filter is not None or version is not None or options or columns != "auto":
            raise ValueError("filter, version, storage_options and columns apply to a URI, not to a dataset")
        return source
    if columns == "auto":
        columns = getattr(collate_fn, "columns", None)
    names = isinstance(columns, (list, tuple)) and all(isinstance(c, str) for c in columns)
    if not (columns is None or names):
        raise TypeError(f"columns takes a list of column names, not {columns!r}")
    return open_dataset(source, filter=filter, version=version, storage_options=options, columns=columns)
