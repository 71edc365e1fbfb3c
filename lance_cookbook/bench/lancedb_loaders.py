"""Loaders (o)-(r): LanceDB's own PyTorch loaders over the benchmark's Lance dataset, with (g)'s collate.

``lancedb`` 0.40.0 (the ``lancedb`` extra) reads the same ``DIR/NAME.lance`` the recipe reads, opened as
``lancedb.connect(DIR).open_table(NAME)`` (docs/lance_loaders.md):

- (o) ``lancedb_stream_clump`` and (p) ``lancedb_stream_rows``: ``lancedb.streaming.StreamingDataset`` read
  through its ``StreamingDataLoader``, rows assigned to ``num_splits`` splits in clumps of
  ``shuffle_clump_size`` consecutive rows (o) or one by one (p), a new order every epoch. The loader refuses
  ``persistent_workers``, and a dataset object yields its rows once, so :class:`EpochStreamingLoader` builds
  a new dataset (``epoch=E``, its permutation built in Rust) and a new loader, with new workers, for every
  pass; both costs fall inside the timed epoch, as they do in a training loop.
- (q) ``lancedb_permutation``: ``lancedb.permutation.Permutation`` over a shuffled permutation table
  (``permutation_builder(table).shuffle(seed=...)``, pinned to the table's version), read map-style
  (``__getitems__``, one ``take_offsets`` per batch) by a plain ``DataLoader`` with the benchmark's
  per-pass random order and persistent workers: the pattern LanceDB's PyTorch page documents
  (``shuffle=True``, ``forkserver``, ``persistent_workers=True``).
- (r) ``lancedb_stream_threads``: (o) with the decode in LanceDB's transform threads and no worker processes
  (``num_workers=0``, as the examples of LanceDB's data-loading page): the same collate runs on each fetched
  ``RecordBatch`` in ``transform=``, and the loader only stacks the decoded rows.

Every loader hands the collate rows ``{"image": bytes, "label": int}`` (only those two columns are read)
and batches of ``batch_size``; workers, where there are any, come from the fork server ``make_loader``
uses (``forkserver``, as LanceDB's documentation recommends; never ``fork``). ``StreamingDataset`` drops
the ``n % num_splits`` surplus rows of every epoch, so ``num_splits`` is the number of workers (one split
each; ``StreamingDataset`` needs a multiple of it) and the row count the benchmark uses is even.

The settings (``STREAM_SETTINGS``) were tuned on this project's 2-core machine, 20,000 32 px JPEGs, 2
workers (docs/benchmark.md); LanceDB's own defaults are ``read_batch_size=64``, ``io_queue_depth=4``,
``transform_parallelism=os.cpu_count()``. ``lancedb`` is imported inside the functions: the core
benchmark imports this module without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..recipe.collate import ImageCollate
from ..recipe.start_method import LOADER_PRELOAD, lance_safe_context

__all__ = [
    "LANCEDB_LOADERS",
    "STREAM_SETTINGS",
    "DecodedRows",
    "EpochStreamingLoader",
    "StackRows",
    "build_lancedb",
    "open_table",
]

LANCEDB_LOADERS: dict[str, str] = {
    "lancedb_stream_clump": "(o) LanceDB StreamingDataset, clumps of 64 + (g)'s collate",
    "lancedb_stream_rows": "(p) LanceDB StreamingDataset, row shuffle + (g)'s collate",
    "lancedb_permutation": "(q) LanceDB Permutation (shuffled) + DataLoader + (g)'s collate",
    "lancedb_stream_threads": "(r) (o) decoded in LanceDB's transform threads, 0 workers",
}

# StreamingDataset keywords per loader, tuned (docs/benchmark.md, "LanceDB's loaders"); shuffle_clump_size 64
# is one batch, as the recipe's BlockShuffleSampler(block_size=64)
STREAM_SETTINGS: dict[str, dict[str, Any]] = {
    "lancedb_stream_clump": dict(
        shuffle_clump_size=64, read_batch_size=256, io_queue_depth=2, transform_parallelism=1
    ),
    "lancedb_stream_rows": dict(
        shuffle_clump_size=None, read_batch_size=256, io_queue_depth=2, transform_parallelism=1
    ),
    "lancedb_stream_threads": dict(
        shuffle_clump_size=64, read_batch_size=256, io_queue_depth=2, transform_parallelism=2
    ),
}
COLUMNS = ["image", "label"]


def open_table(uri: str) -> Any:
    """The LanceDB table of the Lance dataset at ``uri`` (a local folder named ``NAME.lance``).

    Raises
    ------
    ValueError
        If ``uri`` is not a folder whose name ends in ``.lance`` (LanceDB opens ``DIR/NAME.lance`` by NAME).
    """
    import lancedb

    path = Path(uri)
    if path.suffix != ".lance":
        raise ValueError(f"LanceDB opens a table as DIR/NAME.lance; {uri} does not end in .lance")
    return lancedb.connect(str(path.parent)).open_table(path.stem)


class DecodedRows:
    """A ``StreamingDataset`` ``transform``.

    One ``pyarrow.RecordBatch`` of rows ``{"image", "label"}`` -> one ``(image [3, S, S], label)`` per row,
    decoded by ``collate`` as a batch (the recipe's decode, in LanceDB's transform threads).
    """

    def __init__(self, collate: ImageCollate):
        self.collate = collate

    def __call__(self, batch: Any) -> list[tuple[torch.Tensor, int]]:
        """Decode one ``pyarrow.RecordBatch`` into a list of ``(image, label)`` pairs."""
        images, labels = self.collate(batch.to_pylist())
        return list(zip(images, labels.tolist(), strict=True))


class StackRows:
    """The ``collate_fn`` after :class:`DecodedRows`.

    Rows ``(image, label)`` -> ``(images [B, 3, S, S], labels int64 [B])``, what :class:`ImageCollate`
    returns.
    """

    def __call__(self, rows: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack rows into ``(images, labels)``; labels as an int64 tensor."""
        images, labels = zip(*rows, strict=True)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class EpochStreamingLoader:
    """A new ``StreamingDataset(epoch=E)`` and ``StreamingDataLoader`` for every pass.

    The loop a training run writes around LanceDB's loader (it refuses ``persistent_workers``, and one dataset
    object yields its rows once). ``set_epoch(E)`` picks the next pass's epoch, as a sampler's does; without
    it each pass takes the next epoch. ``worker_init_fn`` goes to every pass's loader; other keywords
    (``stream``) to ``StreamingDataset``.

    ``_iterator`` is the current pass's iterator while it runs (and with it its workers); ``num_workers`` and
    ``multiprocessing_context`` are the loader's, so the benchmark finds and measures the workers.
    """

    def __init__(
        self,
        table: Any,
        collate: Any,
        *,
        batch_size: int,
        workers: int,
        seed: int = 0,
        transform: Any = None,
        worker_init_fn: Any = None,
        **stream: Any,
    ):
        self.table, self.collate, self.batch_size = table, collate, batch_size
        self.worker_init_fn = worker_init_fn
        self.num_workers = workers
        self.multiprocessing_context = lance_safe_context(LOADER_PRELOAD) if workers > 0 else None
        self.num_splits = max(1, workers)  # one split per worker
        self.seed, self.transform, self.stream = seed, transform, stream
        self.epoch = 0
        self._iterator: Any = None

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` on the next pass."""
        self.epoch = epoch

    def __iter__(self):
        from lancedb.streaming import StreamingDataLoader, StreamingDataset

        dataset = StreamingDataset(
            self.table,
            num_splits=self.num_splits,
            shuffle_seed=self.seed,
            epoch=self.epoch,
            columns=COLUMNS,
            transform=self.transform,
            **self.stream,
        )
        self.epoch += 1
        loader = StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            multiprocessing_context=self.multiprocessing_context,
            worker_init_fn=self.worker_init_fn,
            pin_memory=False,
        )
        self._iterator = iter(loader)
        try:
            yield from self._iterator
        finally:  # its workers have ended: none to measure or shut down until the next pass
            self._iterator = None


def build_lancedb(
    key: str, uri: str, *, size: int, batch_size: int, workers: int, sampler: Sampler[int], seed: int = 0
) -> tuple[Any, str]:
    """The loader of LanceDB key ``key`` over the Lance dataset ``uri`` and a note of its settings.

    ``sampler`` orders (q)'s ``DataLoader`` (the benchmark's per-pass random order).
    """
    collate = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)
    table = open_table(uri)
    if key == "lancedb_permutation":
        from lancedb.permutation import Permutation, permutation_builder

        order = permutation_builder(table).shuffle(seed=seed).execute()
        dataset = Permutation.from_tables(table, order).select_columns(COLUMNS)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(multiprocessing_context=lance_safe_context(LOADER_PRELOAD), persistent_workers=True)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=False,
            **kwargs,
        )
        return loader, "uint8; shuffle(seed), select_columns, random order per pass, persistent workers"
    settings = STREAM_SETTINGS[key]
    if key == "lancedb_stream_threads":
        loader = EpochStreamingLoader(
            table,
            StackRows(),
            batch_size=batch_size,
            workers=0,
            seed=seed,
            transform=DecodedRows(collate),
            **settings,
        )
    elif key in STREAM_SETTINGS:
        loader = EpochStreamingLoader(
            table, collate, batch_size=batch_size, workers=workers, seed=seed, **settings
        )
    else:
        raise ValueError(f"unknown LanceDB loader {key!r}")
    shown = ", ".join(f"{k}={v}" for k, v in {"num_splits": loader.num_splits, **settings}.items())
    return loader, f"uint8; {shown}; new loader + workers every epoch"
