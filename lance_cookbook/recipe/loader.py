"""The recommended DataLoader over a Lance dataset: batched reads, forkserver or spawn workers, decode in the
collate."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing
from torch.utils.data import DataLoader, Dataset, Sampler

from .collate import ImageCollate
from .dataset import open_dataset
from .start_method import LOADER_PRELOAD, check_start_method, end_with_process, lance_safe_context

__all__ = ["make_loader", "default_workers", "check_start_method", "ReentrantDataLoader", "WorkerInit"]


def default_workers() -> int:
    """One worker per available core, at most 8 (decode is CPU-bound; more workers than cores only add
    start-up time and memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class WorkerInit:
    """``worker_init_fn`` of :func:`make_loader`'s workers: what a forkserver or spawn worker does not get
    from the process that started it, then ``worker_init_fn`` (the caller's, if any).

    - **It ends with that process.** :func:`.start_method.end_with_process`: a worker whose
      training process or notebook kernel was SIGKILLed exits at once, and so does the fork server after
      it; PyTorch's own check watches the parent, which under forkserver is the fork server.
    - **It shares tensors the same way.** ``torch.multiprocessing.set_sharing_strategy('file_system')``,
      PyTorch's remedy for "Too many open files" (pytorch/pytorch#11201), is per process; a worker forked
      from a fresh fork server keeps the default ``file_descriptor`` (pytorch/pytorch#75269). The strategy
      the starting process uses when the workers start is applied in each worker.
    - **It leaves SIGINT to that process.** Jupyter's Kernel > Interrupt sends SIGINT to the kernel's whole
      process group, workers included; PyTorch's worker loop then exits, and a loader's *persistent* workers
      were dead for every later pass (open-mmlab/mmdetection#410). The main process gets the
      ``KeyboardInterrupt`` and stops or resets the workers itself.

    The pid and the strategy are read when the object is pickled, which the loader does in the process that
    starts its workers, at that moment.
    """

    def __init__(self, worker_init_fn: Callable[[int], Any] | None = None):
        self.worker_init_fn = worker_init_fn
        self.owner_pid = os.getpid()
        self.sharing_strategy = torch.multiprocessing.get_sharing_strategy()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "worker_init_fn": self.worker_init_fn,
            "owner_pid": os.getpid(),
            "sharing_strategy": torch.multiprocessing.get_sharing_strategy(),
        }

    def __call__(self, worker_id: int) -> None:
        end_with_process(self.owner_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.multiprocessing.set_sharing_strategy(self.sharing_strategy)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


class ReentrantDataLoader(DataLoader):
    """A ``DataLoader`` whose persistent workers never serve two passes at once.

    With ``persistent_workers=True`` a plain ``DataLoader`` keeps one iterator and ``iter(loader)`` resets and
    returns it, so a second pass started while one is running (a full evaluation pass over the same loader
    mid-epoch, ``zip(loader, loader)``) silently cuts the first short: both share one stream of batches
    (torchrec#2327). Here only one pass at a time uses the persistent workers; a pass started while another is
    still running gets a ``DataLoader`` of its own with short-lived workers (same dataset, sampler, collate
    and options), so every pass yields every batch once. That pass pays the worker start-up again
    (milliseconds from the fork server, about 3 s for 2 spawn workers, ``docs/benchmark.md``). A pass ends
    when its iterator is exhausted or dropped (``break`` out of the loop). Constructor arguments are
    ``DataLoader``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._arguments = (args, kwargs)
        self._pass_running = False

    def __iter__(self):
        if not (self.persistent_workers and self.num_workers > 0):
            return super().__iter__()
        if self._pass_running:
            args, kwargs = self._arguments
            return iter(DataLoader(*args, **{**kwargs, "persistent_workers": False}))
        return _Pass(self, super().__iter__())


class _Pass:
    """One pass over a :class:`ReentrantDataLoader`'s persistent workers; marks the loader busy until the
    pass is exhausted or the iterator is dropped."""

    def __init__(self, loader: ReentrantDataLoader, iterator: Any):
        self._loader = loader
        self._iterator = iterator
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
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
    columns: list[str] | tuple[str, ...] | None | str = "auto",
    multiprocessing_context: str | Any | None = None,
    persistent_workers: bool | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """The recommended ``DataLoader`` over ``SafeLanceDataset``.

    - Reads are batched: the loader hands each worker a list of indices and ``SafeLanceDataset.__getitems__``
      fetches them with one ``take``; ``collate_fn`` then decodes the bytes in the worker.
    - Default ``collate_fn``: ``ImageCollate(224, decoder="torchvision", dtype=torch.uint8)`` (the fastest
      path measured; finish on the device with :func:`lance_cookbook.to_device`).
    - ``num_workers`` defaults to :func:`default_workers`; workers persist across epochs and start from a
      fork server that imported torch, torchvision, PIL and numpy once, never Lance
      (:func:`lance_cookbook.recipe.start_method.lance_safe_context`; spawn where the platform has no
      forkserver): a loader's first batch comes in well under a second instead of about 3 s with spawn
      (``docs/benchmark.md``). ``multiprocessing_context="spawn"`` still works; ``fork`` is refused
      (lance#3640). ``pin_memory`` defaults to ``torch.cuda.is_available()``.
    - Each worker runs :class:`WorkerInit` first (then ``worker_init_fn``, if given): it exits when the
      process that started it dies (a SIGKILLed rank or kernel leaves no worker nor fork server behind),
      uses that process's tensor sharing strategy, and ignores SIGINT (a notebook's Kernel > Interrupt
      leaves persistent workers usable).
    - A URI is opened here first, so a wrong path fails now with its name; ``version`` and
      ``storage_options`` reach every worker.
    - ``columns``: what each batch reads from a URI. ``"auto"`` (default) reads the columns the collate
      names in its ``columns`` attribute (:class:`ImageCollate`: image and label; the other columns cost
      Lance a fifth more per small image) and every column for a collate without one; ``None`` reads
      every column.
    - Returns a :class:`ReentrantDataLoader`: with persistent workers (the default when
      ``num_workers > 0``), a second pass started while one is running gets workers of its own instead
      of silently sharing the first pass's batches.
    - ``batch_size=None`` turns batching off as in ``DataLoader``: each item is one row, decoded by
      ``ImageCollate`` into an unbatched ``(image [3, S, S], label [])``.
    - Pass ``sampler=DistributedSampler(...)`` for DDP training (call ``sampler.set_epoch(epoch)`` every
      epoch) or :class:`lance_cookbook.ShardSampler` for exactly-once evaluation.
    Other keyword arguments (``timeout``, ``prefetch_factor``, ``drop_last``, ``generator`` ...) go to
    ``DataLoader``.
    """
    if collate_fn is None:
        collate_fn = ImageCollate(224, decoder="torchvision", dtype=torch.uint8)
    if isinstance(uri_or_dataset, (str, os.PathLike)):
        if columns == "auto":
            columns = getattr(collate_fn, "columns", None)
        if not (
            columns is None or isinstance(columns, (list, tuple)) and all(isinstance(c, str) for c in columns)
        ):
            raise TypeError(f"columns takes a list of column names, not {columns!r}")
        dataset = open_dataset(
            uri_or_dataset, version=version, storage_options=storage_options, columns=columns
        )
    else:
        if version is not None or storage_options or columns != "auto":
            raise ValueError(
                "version, storage_options and columns apply to a URI; open the dataset with them instead"
            )
        dataset = uri_or_dataset
    if sampler is not None and shuffle:
        raise ValueError("shuffle=True conflicts with a sampler: the sampler decides the order")
    num_workers = default_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
    )
    if num_workers > 0:
        if multiprocessing_context is None:
            kwargs["multiprocessing_context"] = lance_safe_context(LOADER_PRELOAD)
        else:
            kwargs["multiprocessing_context"] = check_start_method(multiprocessing_context)
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kwargs["worker_init_fn"] = WorkerInit(dataloader_kwargs.pop("worker_init_fn", None))
    elif persistent_workers:
        raise ValueError("persistent_workers=True needs num_workers > 0")
    kwargs.update(dataloader_kwargs)
    return ReentrantDataLoader(dataset, **kwargs)
