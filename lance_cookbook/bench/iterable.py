"""Loader (n): Lance's own iterable ``lance.torch.data.LanceDataset`` with its fragment sampler.

Read with (g)'s collate.

How pylance 14.0.2 splits the rows (``lance/torch/data.py``, ``lance/sampler.py``; the usage is
https://lancedb.github.io/lance/integrations/pytorch/):

- Without a ``sampler`` (the default used here), every ``iter()`` in every DataLoader worker builds
  ``ShardedFragmentSampler(rank, world_size)`` with ``rank = dist_rank * num_workers + worker_id`` and
  ``world_size = dist_world_size * num_workers`` (``lance.torch.dist.get_global_rank``), and scans
  ``fragments[rank::world_size]``: every row once per epoch, in whole fragments. A dataset with fewer
  fragments than workers leaves the extra workers idle (the benchmark's conversion writes one fragment
  up to 1,048,576 rows, so one worker of two reads everything).
- An explicit ``sampler=`` is used as given in every worker: ``ShardedFragmentSampler(rank, world_size)``
  as the documentation's DDP example passes it ignores the DataLoader's workers, so each row of the
  rank's shard comes once per worker (measured: 2 workers, every row twice; see lance#2713). Lance's
  own DDP example (lancedb/lance-distributed-training, ``lance_iterable.py``) sets ``num_workers=0``
  under DDP. Not used here.
- The DDP rank is read with ``torch.distributed`` inside the worker; a ``spawn``/``forkserver`` worker has
  no process group, so there it counts as rank 0 of 1 (measured: 2 gloo ranks x 2 workers, each rank
  delivered all rows). This loader is for one process, as the benchmark runs it.
- No shuffle: the default sampler has ``randomize=False`` (with ``randomize=True`` only the fragment
  order is shuffled, with the same seed every epoch), and rows within a fragment come in stored order in
  ``batch_size`` slices. Epochs repeat the same batches; only a dataset shuffled at conversion
  (``--shuffle``) mixes classes within a batch.

The ``to_tensor_fn`` runs in the worker on each ``pyarrow.RecordBatch`` (the default one refuses binary
columns), so the decode happens there, as (g)'s collate does; the DataLoader takes ``batch_size=None``.
"""

from __future__ import annotations

from typing import Any

from lance.torch.data import LanceDataset
from torch.utils.data import DataLoader

from ..recipe.collate import Batch, ImageCollate
from ..recipe.start_method import LOADER_PRELOAD, lance_safe_context

__all__ = ["RecordBatchCollate", "iterable_loader"]


class RecordBatchCollate:
    """A ``to_tensor_fn`` for ``LanceDataset``.

    One ``pyarrow.RecordBatch`` (rows ``{"image": bytes, "label": int}``) to ``collate(batch.to_pylist())``,
    the same rows (g)'s ``SafeLanceDataset`` gives its collate. Picklable, for spawn and forkserver workers.

    ``LanceDataset`` also passes ``hf_converter`` and ``use_blob_api`` keywords; they are ignored (no
    Hugging Face metadata, no blob columns here). Returns what ``collate`` returns (:class:`Batch` of
    ``image [B, 3, S, S]`` and ``label int64 [B]`` for :class:`ImageCollate`).
    """

    def __init__(self, collate: ImageCollate):
        self.collate = collate

    def __call__(self, batch: Any, **_: Any) -> Batch:
        """Collate one ``pyarrow.RecordBatch`` through its rows as dicts."""
        return self.collate(batch.to_pylist())


def iterable_loader(uri: str, collate: ImageCollate, *, batch_size: int, workers: int) -> DataLoader:
    """A ``DataLoader`` over ``LanceDataset(uri)`` with Lance's defaults, reading only ``collate.columns``.

    Lance's defaults: fragment sharding over the workers, ``batch_readahead=16``.

    Batches of at most ``batch_size`` rows (shorter at the end of a worker's fragments); ``workers`` > 0
    start from the same fork server as ``make_loader``'s (``spawn`` where the platform has none; never
    ``fork``, lance#3640) and persist across epochs. The dataset's version is pinned when it is opened
    here (a ``lance.LanceDataset`` pickles its version and manifest).

    Raises
    ------
    ValueError
        If ``uri`` is not a Lance dataset (from ``lance.dataset``), or ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = LanceDataset(
        uri, batch_size, columns=list(collate.columns), to_tensor_fn=RecordBatchCollate(collate)
    )
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(multiprocessing_context=lance_safe_context(LOADER_PRELOAD), persistent_workers=True)
    # batch_size=None: LanceDataset yields whole batches already
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=False, **kwargs)
