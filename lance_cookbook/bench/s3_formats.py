"""The formats :mod:`.s3_traffic` reads from object storage: how each is written, uploaded and read.

Every format holds the same images: the image folder itself (one object per JPEG), a Lance dataset of it
(uploaded file by file: the layout Lance writes to ``s3://`` is the same), and the benchmark's peers
written by :func:`.peers.write_in_child` with their benchmark settings (WebDataset tar shards of 1,000,
MosaicML Streaming MDS and LitData chunks of 64 MB). Each is read the way its library documents for remote
data, in a shuffled order seeded by ``Context.seed``, into the benchmark's collate (``ImageCollate(S,
decoder="torchvision", dtype=torch.uint8)``) in batches, by ``Context.workers`` DataLoader workers (0, the
default: in the reading process, as :mod:`.s3_traffic` counts; :mod:`.s3_latency` times 2 workers, all from
the fork server ``make_loader`` uses):

- ``imagefolder``: a listing (``list_objects_v2``, 1,000 keys a page), then one boto3 ``get_object`` per
  image in ``__getitem__`` of a map-style ``Dataset`` (:class:`S3ImageFolder`), as an ``ImageFolder`` over S3
  does;
- ``lance_random`` / ``lance_block``: the recipe, ``make_loader("s3://...", storage_options=...)`` with its
  defaults for a remote URI (image and label columns), with a random permutation or
  :class:`lance_cookbook.BlockShuffleSampler` (blocks of one batch, window 2) as the sampler;
- ``webdataset``: ``wds.WebDataset`` over presigned ``http://`` URLs of the shards (webdataset opens them
  with ``curl``), shard shuffle and a 1,000-sample buffer as in the benchmark;
- ``streaming``: ``StreamingDataset(remote="s3://...", local=<empty dir>, shuffle=True)`` with the
  endpoint in ``S3_ENDPOINT_URL`` and the keys in ``AWS_*`` (its documented S3-compatible setup): it
  downloads whole shards into ``local``;
- ``litdata``: ``litdata.StreamingDataset("s3://...", storage_options={"endpoint_url": ...},
  shuffle=True)`` and its ``StreamingDataLoader``: it downloads whole chunks into ``cache_dir``;
- ``lancedb_stream`` (:data:`LANCEDB_STREAM`, timed by :mod:`.s3_latency` only): LanceDB's
  ``StreamingDataset`` over ``lancedb.connect("s3://bucket", storage_options=...)``, with the tuned settings
  of loader (o) (:data:`.lancedb_loaders.STREAM_SETTINGS`), a new dataset every pass.

Streaming and LitData download into ``Context.fresh_dir`` directories: every read starts with an empty
cache, so it reads from the store.

The readers themselves (one ``open`` function per library) are in :mod:`.s3_readers`. Peer libraries are
imported inside functions, so the core environment (no peers) imports this module and reads the image folder
and Lance.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from .s3_readers import (
    LANCE_PREFIX,
    S3ImageFolder,
    litdata_http,
    open_imagefolder,
    open_lance,
    open_lancedb,
    open_litdata,
    open_streaming,
    open_webdataset,
    streaming_env,
)

__all__ = ["FORMATS", "LANCEDB_STREAM", "Context", "Format", "S3ImageFolder", "Store", "prepare", "upload"]


@dataclass(frozen=True)
class Store:
    """The S3 server: Lance ``storage_options`` (``aws_endpoint``, keys, region) and the bucket."""

    options: dict[str, str]
    bucket: str

    @property
    def endpoint(self) -> str:
        """The server's URL (``aws_endpoint`` of ``options``)."""
        return self.options["aws_endpoint"]

    def boto3_kwargs(self) -> dict[str, str]:
        """What ``boto3.client("s3", **kwargs)`` needs to reach the server."""
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.options["aws_access_key_id"],
            "aws_secret_access_key": self.options["aws_secret_access_key"],
            "region_name": self.options.get("aws_region", "us-east-1"),
        }

    def client(self) -> Any:
        """A boto3 S3 client for the server."""
        import boto3

        return boto3.client("s3", **self.boto3_kwargs())


@dataclass
class Context:
    """What every reader shares.

    The number of images, the collate's size, batch size, seed, a work directory for download caches, the
    local copy of each uploaded source, the DataLoader workers (0: read in this process) and a
    ``worker_init_fn`` for them (picklable; :class:`.s3_latency.StartLine` times from it).
    """

    images: int
    image_size: int
    batch_size: int
    seed: int
    work: str
    local: dict[str, str] = field(default_factory=dict)
    workers: int = 0
    worker_init_fn: Callable[[int], Any] | None = None

    def loader_kwargs(self) -> dict[str, Any]:
        """``DataLoader`` keywords for ``workers``: the recipe's start method; they end with the pass."""
        from ..recipe.start_method import LOADER_PRELOAD, lance_safe_context

        if self.workers == 0:
            return {"num_workers": 0}
        return {
            "num_workers": self.workers,
            # forkserver preloading torch (never lance), as make_loader and LanceDB's loaders: a worker
            # starts in about 0.5 s instead of 3-15 s under spawn, not timed here but paid by every read
            "multiprocessing_context": lance_safe_context(LOADER_PRELOAD),
            "persistent_workers": False,  # one pass per loader: its workers end with it
            "worker_init_fn": self.worker_init_fn,
        }

    def collate(self) -> Any:
        """A new ``ImageCollate`` of ``image_size`` decoding with torchvision to uint8."""
        import torch

        from ..recipe.collate import ImageCollate

        return ImageCollate(self.image_size, decoder="torchvision", dtype=torch.uint8)

    def fresh_dir(self, name: str) -> str:
        """A new empty directory under ``work``: every epoch downloads into an empty cache."""
        return tempfile.mkdtemp(prefix=name + "-", dir=self.work)

    def order(self, n: int) -> list[int]:
        """The seeded random permutation of ``range(n)``.

        The first pass of the loader benchmark's :class:`.candidates.EpochPermutations`, the order its loaders
        read first.
        """
        from .candidates import EpochPermutations

        return list(EpochPermutations(n, self.seed))


@dataclass(frozen=True)
class Format:
    """A way to read images from the store.

    ``open(store, ctx)`` does what the library does before the first batch (listing, opening, index downloads)
    and returns an iterable of ``(images, labels)`` batches; ``data_suffix`` marks the objects that hold
    images (requests to them are per image); ``setup(store)``, a context manager, holds whatever the library
    needs around the read (its endpoint in environment variables).
    """

    key: str
    label: str
    source: str
    data_suffix: str
    open: Callable[[Store, Context], Iterable[Any]]
    setup: Callable[[Store], AbstractContextManager[None]] | None = None
    modules: tuple[str, ...] = ()  # imported before the first timed read, so no read pays for imports
    # its documented reading overlaps downloads with the consumer: Streaming downloads `predownload`
    # samples ahead (default 8 x batch size) and LitData `max_pre_download` chunks (default 2) in threads of
    # their own; webdataset's curl is a process of its own streaming the shard into a pipe
    downloads_ahead: bool = False

    def is_data(self, path: str) -> bool:
        """Whether the object at ``path`` holds images (its name ends with ``data_suffix``)."""
        return path.endswith(self.data_suffix)

    def environment(self, store: Store) -> AbstractContextManager[None]:
        """``setup(store)``, or a context manager that does nothing without ``setup``."""
        return self.setup(store) if self.setup else nullcontext()


# --- writing and uploading ------------------------------------------------------------------------------


def prepare(sources: Iterable[str], folder: str, lance_path: str, work: str, seed: int) -> dict[str, str]:
    """The local directory of each source.

    The folder, the Lance dataset, and each peer written by :func:`.peers.write_in_child` into ``work/<peer>``
    (in the benchmark's shuffled order ``seed``). Raises ``FileNotFoundError`` for a missing folder or
    dataset, ``RuntimeError`` if a writer fails.
    """
    from .peers import write_in_child

    for path in (folder, lance_path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such directory: {path}")
    local = {"imagefolder": folder, "lance": lance_path}
    for source in sources:
        if source not in local:
            out = os.path.join(work, source)
            write_in_child(source, folder, out, seed)
            local[source] = out
    return {s: local[s] for s in sources}


def upload(store: Store, local_dir: str, source: str) -> int:
    """Upload every file under ``local_dir`` to ``<prefix of source>/<relative path>``; returns the count."""
    prefix = LANCE_PREFIX if source == "lance" else source
    files = [os.path.join(root, n) for root, _, names in os.walk(local_dir) for n in names]
    client = store.client()  # boto3 clients are thread-safe

    def put(path: str) -> None:
        key = f"{prefix}/{os.path.relpath(path, local_dir).replace(os.sep, '/')}"
        client.upload_file(path, store.bucket, key)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, files))
    return len(files)


# --- the formats (how each is read: .s3_readers) --------------------------------------------------------


FORMATS: dict[str, Format] = {
    f.key: f
    for f in [
        Format("imagefolder", "one object per JPEG, boto3 get_object per image", "imagefolder", ".jpg",
               open_imagefolder, modules=("boto3",)),
        Format("lance_random", "Lance, make_loader, random permutation (take of 64 scattered rows)",
               "lance", ".lance", lambda s, c: open_lance(s, c, block=False), modules=("lance",)),
        Format("lance_block", "Lance, make_loader + BlockShuffleSampler(block_size=64, window 2)",
               "lance", ".lance", lambda s, c: open_lance(s, c, block=True), modules=("lance",)),
        Format("webdataset", "WebDataset tar shards of 1,000 over presigned http:// URLs (curl)",
               "webdataset", ".tar", open_webdataset, modules=("webdataset",), downloads_ahead=True),
        Format("streaming", "MosaicML Streaming MDS, remote=s3://, whole shards to local",
               "streaming", ".mds", open_streaming, streaming_env, modules=("streaming",),
               downloads_ahead=True),
        Format("litdata", "LitData chunks, StreamingDataset(s3://), whole chunks to cache_dir",
               "litdata", ".bin", open_litdata, litdata_http, modules=("litdata",), downloads_ahead=True),
    ]
}  # fmt: skip

# timed by .s3_latency only (s3_traffic's model has no CPU figure for it)
LANCEDB_STREAM = Format(
    "lancedb_stream",
    "LanceDB StreamingDataset over s3://, clumps of 64, loader (o)'s tuned settings",
    "lance",
    ".lance",
    open_lancedb,
    modules=("lancedb",),
)
