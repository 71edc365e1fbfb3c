"""How :mod:`.s3_formats` reads each format from the store: one ``open`` function per library.

Each ``open_<format>(store, ctx)`` does what its library does before the first batch and returns an iterable
of ``(images, labels)`` batches, the way :mod:`.s3_formats` describes; the context managers and
``worker_init_fn`` classes here hold what a library needs around the read (its endpoint in environment
variables, plain http allowed for a local server). Peer libraries are imported inside functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .s3_formats import Context, Store

__all__ = [
    "LANCE_PREFIX",
    "LanceDBTable",
    "S3ImageFolder",
    "litdata_http",
    "open_imagefolder",
    "open_lance",
    "open_lancedb",
    "open_litdata",
    "open_streaming",
    "open_webdataset",
    "streaming_env",
]

LANCE_PREFIX = "images.lance"


class S3ImageFolder:
    """A map-style ``Dataset`` of one object per image: ``__getitem__`` is one boto3 ``get_object``.

    ``keys`` are ``<prefix>/<class>/<file>``; the label is the index of ``<class>`` in ``classes``. The boto3
    client is made on first use in each process (clients do not pickle).
    """

    def __init__(self, store: Store, keys: list[str], classes: dict[str, int]):
        self.store, self.keys, self.classes = store, keys, classes
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i``: ``{"image": the object's bytes, "label": its class index}``."""
        if self._client is None:
            self._client = self.store.client()
        key = self.keys[i]
        body = self._client.get_object(Bucket=self.store.bucket, Key=key)["Body"]
        return {"image": body.read(), "label": self.classes[key.split("/")[1]]}


def open_imagefolder(store: Store, ctx: Context) -> Iterable[Any]:
    """The ``imagefolder`` read: a listing, then a ``DataLoader`` over :class:`S3ImageFolder`."""
    from torch.utils.data import DataLoader

    client = store.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix="imagefolder/"):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    keys.sort()
    classes = {c: i for i, c in enumerate(sorted({k.split("/")[1] for k in keys}))}
    dataset = S3ImageFolder(store, keys, classes)
    return DataLoader(
        dataset,
        batch_size=ctx.batch_size,
        sampler=ctx.order(len(keys)),
        collate_fn=ctx.collate(),
        **ctx.loader_kwargs(),
    )


def open_lance(
    store: Store, ctx: Context, *, block: bool, local: bool = False, **options: Any
) -> Iterable[Any]:
    """The recipe: ``make_loader`` of the URI with its defaults and ``options`` (``local``: local copy)."""
    from ..recipe.block_sampler import BlockShuffleSampler
    from ..recipe.loader import make_loader

    if block:  # a Sized of the row count is all the sampler reads of a dataset
        sampler: Any = BlockShuffleSampler(
            range(ctx.images), num_replicas=1, rank=0, seed=ctx.seed, block_size=ctx.batch_size
        )
    else:
        sampler = ctx.order(ctx.images)
    if ctx.workers and ctx.worker_init_fn is not None:
        options["worker_init_fn"] = ctx.worker_init_fn
    if not local:
        options["storage_options"] = store.options
    return make_loader(
        ctx.local["lance"] if local else f"s3://{store.bucket}/{LANCE_PREFIX}",
        batch_size=ctx.batch_size,
        num_workers=ctx.workers,
        sampler=sampler,
        collate_fn=ctx.collate(),
        **options,
    )


def open_webdataset(store: Store, ctx: Context) -> Iterable[Any]:
    """The ``webdataset`` read: ``wds.WebDataset`` over presigned ``http://`` URLs of the shards."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    from .peers import WDS_SHUFFLE_BUFFER, wds_row

    names = sorted(n for n in os.listdir(ctx.local["webdataset"]) if n.endswith(".tar"))
    # the shard names a user writes as a brace pattern (shard-{000000..000019}.tar): no listing. S3 refuses
    # unsigned GETs of private objects, so each URL is presigned (signed here, no request)
    client = store.client()
    urls = [
        client.generate_presigned_url("get_object", Params={"Bucket": store.bucket, "Key": f"webdataset/{n}"})
        for n in names
    ]
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=ctx.seed, empty_check=False)
        .shuffle(WDS_SHUFFLE_BUFFER)
        .map(wds_row)
        .batched(ctx.batch_size, collation_fn=ctx.collate(), partial=True)
    )
    # batched in the workers, whole shards split between them (WebDataset's default worker splitter)
    return DataLoader(dataset, batch_size=None, **ctx.loader_kwargs())


def _streaming_values(store: Store) -> dict[str, str]:
    """Streaming's documented S3-compatible setup: the endpoint in ``S3_ENDPOINT_URL``, keys in ``AWS_*``."""
    kw = store.boto3_kwargs()
    return {
        "S3_ENDPOINT_URL": kw["endpoint_url"],
        "AWS_ACCESS_KEY_ID": kw["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": kw["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": kw["region_name"],
    }


class _WorkerEnvironment:
    """A ``worker_init_fn`` that sets ``values`` in the worker's environment, then runs ``then``.

    Forkserver workers are forked from the fork server, whose environment is the one it started with (at
    the first loader with workers), not the reading process's at the time of the read.
    """

    def __init__(self, values: dict[str, str], then: Callable[[int], Any] | None):
        self.values, self.then = values, then

    def __call__(self, worker_id: int) -> None:
        """Set the variables, then call ``then``."""
        os.environ.update(self.values)
        if self.then is not None:
            self.then(worker_id)


@contextmanager
def streaming_env(store: Store) -> Iterator[None]:
    """:func:`_streaming_values` in this process's environment while Streaming reads."""
    values = _streaming_values(store)
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


def open_streaming(store: Store, ctx: Context) -> Iterable[Any]:
    """The ``streaming`` read: ``StreamingDataset(remote="s3://...")`` into a fresh ``local`` folder."""
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
    kwargs = ctx.loader_kwargs()
    if ctx.workers:
        kwargs["worker_init_fn"] = _WorkerEnvironment(_streaming_values(store), ctx.worker_init_fn)
    return DataLoader(dataset, batch_size=ctx.batch_size, collate_fn=ctx.collate(), **kwargs)


@contextmanager
def litdata_http(store: Store) -> Iterator[None]:
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


class _LitDataHttp:
    """LitData workers' ``worker_init_fn`` at a plain-http endpoint: :func:`litdata_http` in each worker.

    Workers download the chunks, each with LitData's module state of its own (``spawn``), so each must allow
    http itself; then ``then`` runs (the caller's ``worker_init_fn``).
    """

    def __init__(self, then: Callable[[int], Any] | None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        """Allow http in this worker's LitData, then call ``then``."""
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
        if self.then is not None:
            self.then(worker_id)


def open_litdata(store: Store, ctx: Context) -> Iterable[Any]:
    """The ``litdata`` read: ``litdata.StreamingDataset("s3://...")`` into a fresh ``cache_dir``."""
    import litdata

    kwargs = ctx.loader_kwargs()
    if ctx.workers and store.endpoint.startswith("http://"):
        kwargs["worker_init_fn"] = _LitDataHttp(ctx.worker_init_fn)
    dataset = litdata.StreamingDataset(
        f"s3://{store.bucket}/litdata",
        cache_dir=ctx.fresh_dir("litdata"),
        storage_options=store.boto3_kwargs(),
        shuffle=True,
        seed=ctx.seed,
    )
    return litdata.StreamingDataLoader(dataset, batch_size=ctx.batch_size, collate_fn=ctx.collate(), **kwargs)


class LanceDBTable:
    """LanceDB's ``connection_factory``: table ``name`` of ``lancedb.connect(root, storage_options=...)``.

    ``StreamingDataset`` pickles it to each worker, which reopens the table with it (picklable: two values).
    """

    def __init__(self, root: str, options: dict[str, str]):
        self.root, self.options = root, options

    def __call__(self, name: str) -> Any:
        """Open table ``name`` (``<root>/<name>.lance``)."""
        import lancedb

        return lancedb.connect(self.root, storage_options=self.options).open_table(name)


def open_lancedb(store: Store, ctx: Context) -> Iterable[Any]:
    """The ``lancedb_stream`` read: LanceDB's ``StreamingDataset`` with loader (o)'s tuned settings."""
    from .lancedb_loaders import STREAM_SETTINGS, EpochStreamingLoader

    connect = LanceDBTable(f"s3://{store.bucket}", store.options)
    return EpochStreamingLoader(
        connect(LANCE_PREFIX.removesuffix(".lance")),
        ctx.collate(),
        batch_size=ctx.batch_size,
        workers=ctx.workers,
        seed=ctx.seed,
        worker_init_fn=ctx.worker_init_fn,
        connection_factory=connect,
        **STREAM_SETTINGS["lancedb_stream_clump"],
    )
