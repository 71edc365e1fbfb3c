"""Loader benchmark: images/s of PyTorch loaders over the same images, from an image folder and from Lance.

    python -m lance_cookbook.bench --imagefolder DIR [--lance URI] [--image-size S] [--batch-size B]
        [--workers W] [--epochs E] [--json FILE] [--plot FILE] [--quick]
        [--generate N --generate-size WxH] [--cache warm|cold|both]

Every loader reads the same images in the same shuffled order, with the same batch size, the same number
of workers (kept alive across epochs; ``spawn``, or ``forkserver`` where ``make_loader`` starts them, its
default) and the same output size. The first epoch of each loader is
a warm-up (its time to the first batch is reported as start-up); the timed epochs of all loaders are
interleaved, round after round, and the best round of each is kept, so a burst of load from elsewhere on
the machine hurts every loader alike instead of one. The decode bounds are the decode + resize of one
image format in a plain loop on one core (one torch thread), times the workers: what the workers could
reach if reading, batching and handing tensors to the main process cost nothing.

Loaders (keys for ``--loaders``):
  bound_pil          (a) PIL decode + Resize + ToTensor in a loop, 1 core x workers
  bound_tv           (a) TorchCodec decode_jpeg + uint8 Resize in a loop, 1 core x workers
  imagefolder_pil    (b) torchvision ImageFolder + Resize + CenterCrop + ToTensor: what users write today
  imagefolder_tv     (c) ImageFolder reading bytes + the collate of (g): isolates the storage format
  hf_datasets        (d) HF datasets load_dataset("imagefolder") + set_transform(Resize + ToTensor)
  lance_rows         (e) SafeLanceDataset row by row (one take per image) + the collate of (g)
  lance_pil_float32  (f) make_loader + ImageCollate(S) (decoder="pil", float32): the recipe as Lance's
                         documentation prints it
  lance_tv_uint8     (g) make_loader + ImageCollate(S, decoder="torchvision", dtype=torch.uint8): this
                         cookbook's recipe (LanceImageDataset: image and label columns only, one sorted take
                         per batch)
  lance_all_columns  (h) (g) through SafeLanceDataset as is: every column, indices in sampler order
  lance_arrow        (i) (g) with the Arrow table handed to the collate: JPEG bytes decoded in place, no
                         Python bytes or dicts

Peers (``--loaders peers`` or their keys; not in the default set: they need the ``bench`` extra, installed
in an environment of its own, ``.venv-bench`` of ``make bench``; see docs/benchmark.md), each written from
the same images in a fresh process and read with (g)'s collate:
  webdataset         (k) WebDataset tar shards, shard shuffle + sample buffer, batched in the workers
  streaming          (l) MosaicML Streaming MDS shards, StreamingDataset(shuffle=True)
  litdata            (m) LitData optimize chunks, StreamingDataset(shuffle=True) + StreamingDataLoader

Opt-in (not in the default set; name it in ``--loaders``):
  lance_iterable     (n) Lance's iterable LanceDataset, default fragment sharding over the workers, (g)'s
                         collate; reads in stored order (no shuffle)

``--breakdown`` also times each step of a worker of (g) on its own (CPU us per image), and every loader
reports the CPU time per image its main process and its workers spent in the best timed epoch.

``--cache cold`` evicts every file of a loader's data from the page cache (``posix_fadvise(DONTNEED)``, no
privileges) before each of its timed epochs: the regime of a dataset larger than memory; ``--cache both``
reports warm and cold figures side by side.

Also reported: conversion images/s and peak RSS (in a fresh process), bytes on disk per format, peak RSS
of the main process (per loader) and of the workers, in MiB. Output: a table on stdout, ``--json``,
``--plot``.

Modules: :mod:`.candidates` (the loaders and their timed epoch), :mod:`.arrow` and :mod:`.baselines` (the
datasets and collates they add), :mod:`.measure` (CPU seconds and RSS through psutil), :mod:`.conversion`,
:mod:`.breakdown`, :mod:`.cache` (page-cache eviction), :mod:`.peers`, :mod:`.lancedb_loaders` (LanceDB's
StreamingDataset and Permutation), :mod:`.runner` (the whole run), :mod:`.report` (table and plot),
:mod:`.cli`; :mod:`.s3_traffic` and :mod:`.s3_formats` (requests and bytes per image from a local S3 server,
``python -m lance_cookbook.bench.s3_traffic``); :mod:`.s3_latency` and :mod:`.s3_servers` (images/s of each
loader from SeaweedFS behind Envoy at 0, 10 and 50 ms per request, ``python -m
lance_cookbook.bench.s3_latency``).
"""

from .arrow import ArrowImageCollate, ArrowLanceDataset, jpeg_views
from .baselines import BytesImageFolder, HFTransform, RowByRowDataset
from .breakdown import breakdown
from .cache import evict
from .candidates import ALL_LOADERS, BOUNDS, LOADERS
from .cli import build_parser, main
from .lancedb_loaders import LANCEDB_LOADERS
from .peers import PEER_LOADERS
from .report import format_table, plot
from .runner import run

__all__ = [
    "ALL_LOADERS",
    "ArrowImageCollate",
    "ArrowLanceDataset",
    "BOUNDS",
    "BytesImageFolder",
    "HFTransform",
    "LANCEDB_LOADERS",
    "LOADERS",
    "PEER_LOADERS",
    "RowByRowDataset",
    "breakdown",
    "build_parser",
    "evict",
    "format_table",
    "jpeg_views",
    "main",
    "plot",
    "run",
]
