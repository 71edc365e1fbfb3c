"""The formats :mod:`.s3_traffic` reads from object storage: how each is written, uploaded and read.

Every format holds the same images: the image folder itself (one object per JPEG), a Lance dataset of it
(uploaded file by file: the layout Lance writes to ``s3://`` is the same), and the benchmark's peers
written by :func:`.peers.write_in_child` with their benchmark settings (WebDataset tar shards of 1,000,
MosaicML Streaming MDS and LitData chunks of 64 MB). Each is read in one process (no DataLoader workers)
the way its library documents for remote data, in a shuffled order seeded by ``Context.seed``, into the
benchmark's collate (``ImageCollate(S, decoder="torchvision", dtype=torch.uint8)``) in batches:

- ``imagefolder``: a listing (``list_objects_v2``, 1,000 keys a page), then one boto3 ``get_object`` per
  image, as an ``ImageFolder``-like ``Dataset`` over S3 does in ``__getitem__``;
- ``lance_random`` / ``lance_block``: the recipe, ``make_loader`` over ``open_dataset("s3://...",
  storage_options=...)`` (image and label columns), with a random permutation or
  :class:`lance_cookbook.BlockShuffleSampler` (blocks of one batch, window 2) as the sampler;
- ``webdataset``: ``wds.WebDataset`` over presigned ``http://`` URLs of the shards (webdataset opens them
  with ``curl``), shard shuffle and a 1,000-sample buffer as in the benchmark;
- ``streaming``: ``StreamingDataset(remote="s3://...", local=<empty dir>, shuffle=True)`` with the
  endpoint in ``S3_ENDPOINT_URL`` and the keys in ``AWS_*`` (its documented S3-compatible setup): it
  downloads whole shards into ``local``;
- ``litdata``: ``litdata.StreamingDataset("s3://...", storage_options={"endpoint_url": ...},
  shuffle=True)`` and its ``StreamingDataLoader``: it downloads whole chunks into ``cache_dir``.

Peer libraries are imported inside functions, so the core environment (no peers) imports this module and
reads the image folder and Lance.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FORMATS", "Context", "Format", "Store", "prepare", "upload"]

LANCE_PREFIX = "images.lance"


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

    The number of images, the collate's size, batch size, seed, a work directory for download caches, and the
    local copy of each uploaded source.
    """

    images: int
    image_size: int
    batch_size: int
    seed: int
    work: str
    local: dict[str, str] = field(default_factory=dict)

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


# --- reading --------------------------------------------------------------------------------------------


def _open_imagefolder(store: Store, ctx: Context) -> Iterable[Any]:
    client = store.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix="imagefolder/"):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    keys.sort()
    classes = {c: i for i, c in enumerate(sorted({k.split("/")[1] for k in keys}))}
    order, collate = ctx.order(len(keys)), ctx.collate()

    def batches() -> Iterator[Any]:
        for start in range(0, len(order), ctx.batch_size):
            rows = []
            for i in order[start : start + ctx.batch_size]:
                body = client.get_object(Bucket=store.bucket, Key=keys[i])["Body"]
                rows.append({"image": body.read(), "label": classes[keys[i].split("/")[1]]})
            yield collate(rows)

    return batches()


def _open_lance(store: Store, ctx: Context, *, block: bool) -> Iterable[Any]:
    from ..recipe.block_sampler import BlockShuffleSampler
    from ..recipe.dataset import open_dataset
    from ..recipe.loader import make_loader

    collate = ctx.collate()
    uri = f"s3://{store.bucket}/{LANCE_PREFIX}"
    dataset = open_dataset(uri, storage_options=store.options, columns=list(collate.columns))
    if block:
        sampler: Any = BlockShuffleSampler(
            dataset, num_replicas=1, rank=0, seed=ctx.seed, block_size=ctx.batch_size
        )
    else:
        sampler = ctx.order(len(dataset))
    return make_loader(dataset, batch_size=ctx.batch_size, num_workers=0, sampler=sampler, collate_fn=collate)


def _open_webdataset(store: Store, ctx: Context) -> Iterable[Any]:
    import webdataset as wds

    from .peers import WDS_SHUFFLE_BUFFER, wds_row

    names = sorted(n for n in os.listdir(ctx.local["webdataset"]) if n.endswith(".tar"))
    # the shard names a user writes as a brace pattern (shard-{000000..000019}.tar): no listing. S3 refuses
    # unsigned GETs of private objects, so each URL is presigned (signed here, no request)
    client = store.client()
    urls = [
        client.generate_presigned_url("get_object", Params={"Bucket": store.bucket, "Key": f"webdataset/{n}"})
        for n in names
    ]
    return (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=ctx.seed, empty_check=False)
        .shuffle(WDS_SHUFFLE_BUFFER)
        .map(wds_row)
        .batched(ctx.batch_size, collation_fn=ctx.collate(), partial=True)
    )


@contextmanager
def _streaming_env(store: Store) -> Iterator[None]:
    """Streaming's documented S3-compatible setup: the endpoint in ``S3_ENDPOINT_URL``, keys in ``AWS_*``."""
    kw = store.boto3_kwargs()
    values = {
        "S3_ENDPOINT_URL": kw["endpoint_url"],
        "AWS_ACCESS_KEY_ID": kw["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": kw["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": kw["region_name"],
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _open_streaming(store: Store, ctx: Context) -> Iterable[Any]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    dataset = StreamingDataset(
        remote=f"s3://{store.bucket}/streaming",
        local=ctx.fresh_dir("streaming"),
        shuffle=True,
        shuffle_seed=ctx.seed,
        batch_size=ctx.batch_size,
    )
    return DataLoader(dataset, batch_size=ctx.batch_size, collate_fn=ctx.collate(), num_workers=0)


@contextmanager
def _litdata_http(store: Store) -> Iterator[None]:
    """Let LitData reach a plain-http endpoint while it reads (for a local server only).

    LitData fetches chunks through obstore with client options of its own that lack ``allow_http``, so a
    plain-http endpoint fails ("HTTP error: builder error", as in obstore#159); AWS itself is https and needs
    nothing. For a local server only, those options allow http while LitData reads.
    """
    from litdata.streaming import downloader

    options = downloader._OBSTORE_CLIENT_OPTIONS
    added = store.endpoint.startswith("http://") and "allow_http" not in options
    if added:
        options["allow_http"] = "true"
    try:
        yield
    finally:
        if added:
            options.pop("allow_http", None)


def _open_litdata(store: Store, ctx: Context) -> Iterable[Any]:
    import litdata

    dataset = litdata.StreamingDataset(
        f"s3://{store.bucket}/litdata",
        cache_dir=ctx.fresh_dir("litdata"),
        storage_options=store.boto3_kwargs(),
        shuffle=True,
        seed=ctx.seed,
    )
    return litdata.StreamingDataLoader(
        dataset, batch_size=ctx.batch_size, collate_fn=ctx.collate(), num_workers=0
    )


FORMATS: dict[str, Format] = {
    f.key: f
    for f in [
        Format("imagefolder", "one object per JPEG, boto3 get_object per image", "imagefolder", ".jpg",
               _open_imagefolder, modules=("boto3",)),
        Format("lance_random", "Lance, make_loader, random permutation (take of 64 scattered rows)",
               "lance", ".lance", lambda s, c: _open_lance(s, c, block=False), modules=("lance",)),
        Format("lance_block", "Lance, make_loader + BlockShuffleSampler(block_size=64, window 2)",
               "lance", ".lance", lambda s, c: _open_lance(s, c, block=True), modules=("lance",)),
        Format("webdataset", "WebDataset tar shards of 1,000 over presigned http:// URLs (curl)",
               "webdataset", ".tar", _open_webdataset, modules=("webdataset",), downloads_ahead=True),
        Format("streaming", "MosaicML Streaming MDS, remote=s3://, whole shards to local",
               "streaming", ".mds", _open_streaming, _streaming_env, modules=("streaming",),
               downloads_ahead=True),
        Format("litdata", "LitData chunks, StreamingDataset(s3://), whole chunks to cache_dir",
               "litdata", ".bin", _open_litdata, _litdata_http, modules=("litdata",), downloads_ahead=True),
    ]
}  # fmt: skip
