"""Writing checked records into Lance: schema, data files streamed batch by batch, and the one atomic commit.

On failure nothing is left behind.
A new local dataset is written beside its destination (``.NAME.partial-PID``) and renamed into place only
when complete; an existing dataset, or any dataset on object storage, gets its data files first and then one
commit, so a failed or interrupted run leaves the previous version the latest. Data files a failed run wrote
are deleted again (:meth:`Destination.abandon`); what cannot be deleted is named.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lance
import pyarrow as pa
from lance.file import LanceFileSession
from lance.fragment import FragmentMetadata, write_fragments

from lance_cookbook.recipe.store_errors import silent_endpoint_reason, store_error_reason

from .check import ConversionError, InvalidImage, ParameterError
from .pool import Checked
from .result import Written

__all__ = [
    "LABEL_NAMES_KEY",
    "METADATA_KEY",
    "RECORD_FIELD",
    "SCHEMA",
    "Destination",
    "conversion_record",
    "dataset_metadata",
    "record_batches",
    "write_stream",
]

METADATA_KEY = b"lance_cookbook"
LABEL_NAMES_KEY = b"label_names"
# Both go on fields, none on the schema: LanceDB 0.40.0's loaders panic on schema-level metadata (see
# docs/lance_loaders.md). The conversion record stays on a field, not in Lance's table metadata, because
# pylance 14 cannot set table metadata in the Overwrite commit and a conversion is one commit (one version).
RECORD_FIELD = "image"
STOP_TIMEOUT_S = 60  # how long a failed conversion waits for lance's reader thread to leave our code

SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)


def record_batches(
    checked: Iterable[Iterable[Checked]],
    written: Written,
    max_rows: int | None,
    skip_invalid: bool,
    progress,
    description: str,
) -> Iterator[pa.RecordBatch]:
    """One record batch per batch of checked records: valid rows numbered in order, up to ``max_rows``.

    Counts each row into ``written``; an invalid record raises :class:`InvalidImage`, or with
    ``skip_invalid`` is listed in ``written.skipped``; raises :class:`ConversionError` when no record is
    valid. ``progress``: a tqdm bar, one step per record.
    """
    for results in checked:
        cols: dict[str, list] = {f.name: [] for f in SCHEMA}
        for record, data, result in results:
            progress.update(1)
            if isinstance(result, InvalidImage):
                written.skip(result, skip_invalid, progress)
                continue
            if max_rows is not None and written.rows >= max_rows:
                break
            cols["image"].append(data)
            cols["label"].append(record.label)
            cols["id"].append(written.rows)
            cols["source"].append(record.source)
            cols["width"].append(result[0])
            cols["height"].append(result[1])
            written.add(record.label, len(data))
        if cols["id"]:
            batch = pa.RecordBatch.from_pydict(cols, schema=SCHEMA)
            # Lance holds the Arrow copy while it writes: drop ours of the images first, so a batch is
            # held twice only while it is converted (the t3-conv-large-images-memory report)
            cols = record = data = result = results = None
            yield batch
        if max_rows is not None and written.rows >= max_rows:
            break
    written.require_rows(description)


def write_stream(
    batches: Iterator[pa.RecordBatch],
    target: str,
    *,
    mode: str,
    rows_per_file: int,
    storage_options: dict[str, str] | None,
    generators: Iterable[Iterator] = (),
    on_failure: Callable[[], None] = lambda: None,
) -> list[FragmentMetadata]:
    """Write ``batches`` as Lance data files under ``target``; return their fragments, uncommitted.

    Lance pulls the batches on its own reader thread. On any failure, an interrupt in this thread included,
    ``on_failure`` runs first (it must make a reader thread that waits inside ``batches`` return, e.g. by
    closing the pool it waits on), then ``generators`` (ours, which the reader thread runs) are closed once
    that thread is out of them, and the first exception raised inside ``batches`` (an invalid image, not
    Arrow's wrapping of it) is re-raised.
    """
    failure: list[BaseException] = []
    # Python code still running on a foreign thread at interpreter exit aborts the process, so the reader
    # thread must be out of our code before we return.
    stop = threading.Event()
    running = threading.Lock()  # held while the reader thread is inside the generator

    def guarded() -> Iterator[pa.RecordBatch]:
        try:
            while True:
                with running:
                    if stop.is_set():
                        raise ConversionError("conversion stopped")
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch
        except BaseException as e:
            if not stop.is_set():  # keep its exception so the caller sees ours, not Arrow's
                failure.append(e)
            raise

    try:
        return write_fragments(
            pa.RecordBatchReader.from_batches(SCHEMA, guarded()),
            target,
            schema=SCHEMA,
            mode=mode,
            max_rows_per_file=rows_per_file,
            storage_options=storage_options,
        )
    except BaseException as e:
        stop.set()
        on_failure()
        if running.acquire(timeout=STOP_TIMEOUT_S):  # the reader thread is out of the generator
            try:
                for gen in generators:  # ends the checking threads too (their executor's with block)
                    gen.close()
            finally:
                running.release()
        else:
            warnings.warn(
                f"lance's reader thread did not leave the conversion within {STOP_TIMEOUT_S} s",
                RuntimeWarning,
                stacklevel=2,
            )
        if failure and failure[0] is not e:
            raise failure[0] from None
        raise


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def store_error(uri: str, error: BaseException, doing: str) -> ConversionError | None:
    """``error`` from Lance as one line naming ``uri`` and the cause, when it is an object store's refusal."""
    reason = store_error_reason(uri, error) if isinstance(error, OSError | ValueError) else None
    return None if reason is None else ConversionError(f"cannot {doing} {uri}: {reason}")


def dataset_exists(uri: str, storage_options: dict[str, str] | None) -> bool:
    """Whether ``uri`` holds a Lance dataset.

    A store that refuses (no bucket, bad credentials, a scheme Lance has no store for) raises
    :class:`ConversionError` naming it rather than counting as "no dataset", and so does an endpoint that
    accepts a connection and never answers (Lance would retry it for minutes).
    """
    silent = silent_endpoint_reason(storage_options)
    if silent:
        raise ConversionError(f"cannot open {uri}: {silent}")
    try:
        lance.dataset(uri, storage_options=storage_options)
        return True
    except (ValueError, OSError) as e:
        refused = store_error(uri, e, "open")
        if refused is not None:
            raise refused from None
        return False


class Destination:
    """Where a conversion writes, and how to undo a write that did not commit.

    ``uri``: the output as given; ``target``: where data files go (a staging folder beside a new local
    dataset, else ``uri``), absolute for a local path so that it means the same on every worker and Ray
    task; ``exists``: whether ``uri`` holds a dataset already. Raises :class:`ConversionError` for an output
    it must not write to (a file, a folder that is not a dataset, a dataset without ``overwrite``).
    """

    def __init__(self, uri: str, *, overwrite: bool, storage_options: dict[str, str] | None):
        self.uri = uri
        self.storage_options = storage_options
        self.remote = is_remote(uri)
        self.exists = dataset_exists(uri, storage_options)
        self.path = None if self.remote else Path(uri).absolute()
        if self.path is not None:
            if self.path.exists() and not self.path.is_dir():
                raise ConversionError(f"output {uri} exists and is a file, not a Lance dataset")
            if self.path.is_dir() and not self.exists and any(self.path.iterdir()):
                raise ConversionError(
                    f"output {uri} is a non-empty folder that is not a Lance dataset; refusing to write there"
                )
        if self.exists and not overwrite:
            raise ParameterError(
                f"output {uri} already holds a Lance dataset; pass {{name}} to replace it",
                "overwrite=True",
                "--overwrite",
            )
        self.mode = "overwrite" if self.exists else "create"
        self.staging: Path | None = None
        self.made: list[Path] = []  # folders created for the output, removed again if the conversion fails
        self.before: set[str] | None = None  # files under target before the write (None: all are ours)
        self.target = uri if self.path is None else str(self.path)

    def prepare(self) -> None:
        """Make the staging folder of a new local dataset, or note what is under the dataset already."""
        if self.path is not None and not self.exists:
            self.made = [p for p in self.path.parents if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
            shutil.rmtree(self.staging, ignore_errors=True)
            self.target = str(self.staging)
        else:
            self.before = set(self._files())

    def _files(self) -> list[str]:
        return LanceFileSession(self.target, storage_options=self.storage_options).list()

    def commit(self, fragments: list[FragmentMetadata], metadata: dict[str, dict[bytes, bytes]], rows: int):
        """Make ``fragments`` the dataset's new version in one commit; return the dataset, read back.

        ``metadata`` maps field names to that field's metadata (:func:`dataset_metadata`).

        Every data file must be visible from here first: a Ray task whose path meant another folder (a
        relative path, a node's own disk) would otherwise leave a dataset that cannot be read.
        """
        session = LanceFileSession(self.target, storage_options=self.storage_options)
        for fragment in fragments:
            for file in fragment.files:
                if not session.contains(f"data/{file.path}"):
                    raise ConversionError(
                        f"data file data/{file.path} of {self.uri} was written where this machine cannot see "
                        "it: the workers must write to storage this machine shares (object storage, or the "
                        "same path on a shared file system)"
                    )
        read_version = (
            lance.dataset(self.uri, storage_options=self.storage_options).version if self.exists else None
        )
        lance.LanceDataset.commit(
            self.target,
            lance.LanceOperation.Overwrite(_schema_with(metadata), fragments),
            read_version=read_version,
            storage_options=self.storage_options,
        )
        if self.staging is not None:
            try:
                os.replace(self.staging, self.path)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Another process wrote a dataset there since this one started (t3-nb-parallel-first-run):
                # keep it, and drop ours (abandon() removes the staging folder)
                raise ConversionError(
                    f"output {self.uri} was created by another process while this conversion ran; it is "
                    "kept as it is and nothing of this run was written there"
                ) from None
            self.staging = None
        ds = lance.dataset(self.uri, storage_options=self.storage_options)
        if ds.count_rows() != rows:
            raise ConversionError(f"{self.uri} reads back {ds.count_rows():,} rows, not the {rows:,} written")
        return ds

    def abandon(self) -> list[str]:
        """Undo an uncommitted write.

        Removes the staging folder and the folders made for it, or deletes the files written under an
        existing dataset or on object storage. Returns what could not be deleted.
        """
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        for folder in self.made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: something else wrote there meanwhile
        if self.before is None:
            return []
        try:
            session = LanceFileSession(self.target, storage_options=self.storage_options)
            ours = [f for f in session.list() if f not in self.before]
        except (OSError, ValueError):
            return ["(the files under it could not be listed)"]
        left = []
        for name in ours:
            try:
                session.delete_file(name)
            except (OSError, ValueError):
                left.append(name)
        return left


def dataset_metadata(label_names: list[str], info: dict) -> dict[str, dict[bytes, bytes]]:
    """The field metadata of a converted dataset, by field name.

    The class names on the ``label`` field (``label_names``, a JSON list, read by
    :func:`lance_cookbook.label_names`) and what the conversion did on the ``image`` field
    (``lance_cookbook``, a JSON object, read by :func:`conversion_record`).
    """
    return {
        "label": {LABEL_NAMES_KEY: json.dumps(label_names).encode()},
        RECORD_FIELD: {METADATA_KEY: json.dumps(info).encode()},
    }


def _schema_with(metadata: dict[str, dict[bytes, bytes]]) -> pa.Schema:
    return pa.schema([f.with_metadata(metadata[f.name]) if f.name in metadata else f for f in SCHEMA])


def conversion_record(ds: lance.LanceDataset) -> dict:
    """What the conversion of ``ds`` did (rows skipped, unlabelled, warnings, shuffle).

    The JSON object stored under ``lance_cookbook`` on the ``image`` field, or in the schema metadata of a
    dataset converted before that moved (see :mod:`data_prep.migrate`); ``{}`` when there is none. Raises
    ``json.JSONDecodeError`` when the stored value is not JSON.
    """
    from lance_cookbook.recipe.dataset import stored_metadata

    raw = stored_metadata(ds.schema, RECORD_FIELD, METADATA_KEY)
    return json.loads(raw) if raw else {}
