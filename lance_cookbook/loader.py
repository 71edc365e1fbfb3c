"""The recommended DataLoader over a Lance dataset: batched reads, spawn workers, decode in the collate."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .collate import ImageCollate
from .dataset import open_dataset

__all__ = ["make_loader", "default_workers", "check_start_method"]


def default_workers() -> int:
    """One worker per available core, at most 8 (decode is CPU-bound; more workers than cores only add
    start-up time and memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def check_start_method(context: str | Any) -> Any:
    """Return a multiprocessing context that is safe with Lance, or raise for ``fork``.

    Lance's Rust runtime holds threads and locks that a forked child inherits in an unknown state
    (deadlocks and segfaults: lance#3640, lance#2204), so only ``spawn`` and ``forkserver`` are allowed.
    """
    ctx = multiprocessing.get_context(context) if isinstance(context, str) or context is None else context
    method = ctx.get_start_method()
    if method == "fork":
        raise ValueError(
            "the 'fork' start method is not safe with Lance (a forked worker inherits the Lance runtime's "
            "threads and locks and can deadlock or segfault); use multiprocessing_context='spawn' "
            "(default) or 'forkserver'"
        )
    return ctx


def make_loader(
    uri_or_dataset: str | os.PathLike | Dataset,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    collate_fn: Any = None,
    pin_memory: bool | None = None,
    version: int | str | None = None,
    storage_options: dict[str, str] | None = None,
    columns: list[str] | tuple[str, ...] | None | str = "auto",
    multiprocessing_context: str | Any = "spawn",
    persistent_workers: bool | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """The recommended ``DataLoader`` over ``SafeLanceDataset``.

    - Reads are batched: the loader hands each worker a list of indices and ``SafeLanceDataset.__getitems__``
      fetches them with one ``take``; ``collate_fn`` then decodes the bytes in the worker.
    - Default ``collate_fn``: ``ImageCollate(224, decoder="torchvision", dtype=torch.uint8)`` (the fastest
      path measured; finish on the device with :func:`lance_cookbook.to_device`).
    - ``num_workers`` defaults to :func:`default_workers`; workers start with ``spawn`` (``fork`` is refused)
      and persist across epochs; ``pin_memory`` defaults to ``torch.cuda.is_available()``.
    - A URI is opened here first, so a wrong path fails now with its name; ``version`` and
      ``storage_options`` reach every worker.
    - ``columns``: what each batch reads from a URI. ``"auto"`` (default) reads the columns the collate
      names in its ``columns`` attribute (:class:`ImageCollate`: image and label; the other columns cost
      Lance a fifth more per small image) and every column for a collate without one; ``None`` reads
      every column.
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
        kwargs["multiprocessing_context"] = check_start_method(multiprocessing_context)
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
    elif persistent_workers:
        raise ValueError("persistent_workers=True needs num_workers > 0")
    kwargs.update(dataloader_kwargs)
    return DataLoader(dataset, **kwargs)
