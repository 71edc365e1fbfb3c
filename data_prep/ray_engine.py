"""``--engine ray``: check images and write Lance data files in parallel on a Ray cluster.

The driver (the process running ``data_prep.convert``) enumerates the source and cuts it into blocks of
``block_rows`` records and at most ``block_bytes`` of images, in source order. Then, on any node of the
cluster:

1. a ``_check_block`` task per block reads each image (from its path or from the bytes the source gave),
   checks it with :func:`data_prep.check.check_image`, and returns a small per-record summary to the
   driver; the valid rows stay in Ray's object store as an Arrow batch;
2. the driver reads the summaries in source order, so it numbers the rows (``id``), stops at ``max_rows``
   and stops at (or, with ``skip_invalid``, records) an invalid image exactly where the local path does;
3. a ``_write_rows`` task per group of consecutive blocks (up to ``rows_per_file`` rows or
   ``fragment_bytes``) calls :func:`lance.fragment.write_fragments` and returns the ``FragmentMetadata``.

Nothing is committed here: :func:`data_prep.engine.write_and_commit` commits the fragments, in source
order, with its one ``LanceDataset.commit`` (``data_prep.write``), so the dataset holds the same rows in the
same order as with ``--engine local``, and a failure before that commit leaves no new version.

Ray (:func:`connect`): an already-initialised Ray is used as is. Otherwise ``ray.init()`` joins the cluster
named by ``RAY_ADDRESS`` (``ray start --head`` / a ``RayCluster``), once its address answers, or, without
``RAY_ADDRESS``, starts a local one, and shuts it down after. Every node must be able to import
``data_prep`` (install the project there), to read the source paths (absolute: ``data_prep.sources``
resolves them where the command runs) and to write the output (object storage or a shared file system;
``data_prep.write`` checks that the driver sees every data file before it commits).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from .check import ConversionError, InvalidImage, apply_pil_settings, pil_settings
from .pool import BATCH_BYTES, batched, checked_records
from .result import Written
from .sources import Record
from .write import SCHEMA

__all__ = ["connect", "write_fragments_ray"]

# 256 MB of images per write task: few enough data files for large datasets, small enough for the object store
FRAGMENT_BYTES = 256 * 1024 * 1024


def _check_block(records: list[Record], settings: dict) -> tuple[list[Any], pa.RecordBatch]:
    """Check ``records`` with the driver's PIL ``settings``; return ``(outcomes, valid_rows)``.

    ``settings`` is :func:`data_prep.check.pil_settings`: its pixel limit, so a node accepts what the local
    path would.

    ``outcomes[i]`` is ``(label, n_bytes)`` for a valid record and ``(where, reason)`` strings for an invalid
    one; ``valid_rows`` holds the valid records in order (``id`` is set later by the writer).
    """
    apply_pil_settings(settings)
    outcomes: list[Any] = []
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    with warnings.catch_warnings():
        # the check refuses an image over the limit with its own message; PIL's warning below it is noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checked = checked_records(records)
    for record, data, result in checked:
        if isinstance(result, InvalidImage):
            outcomes.append((result.where, result.reason))
            continue
        outcomes.append((record.label, len(data)))
        cols["image"].append(data)
        cols["label"].append(record.label)
        cols["id"].append(0)
        cols["source"].append(record.source)
        cols["width"].append(result[0])
        cols["height"].append(result[1])
    return outcomes, pa.RecordBatch.from_pydict(cols, schema=SCHEMA)


def _write_rows(
    target: str,
    first_id: int,
    takes: list[int],
    mode: str,
    rows_per_file: int,
    storage_options: dict[str, str] | None,
    *batches: pa.RecordBatch,
) -> list:
    """Write the first ``takes[i]`` rows of each batch, numbered from ``first_id``, as Lance data files."""
    from lance.fragment import write_fragments

    table = pa.Table.from_batches([b.slice(0, n) for b, n in zip(batches, takes, strict=True)], schema=SCHEMA)
    ids = pa.array(range(first_id, first_id + table.num_rows), type=pa.int64())
    table = table.set_column(SCHEMA.get_field_index("id"), SCHEMA.field("id"), ids)
    return write_fragments(
        table,
        target,
        schema=SCHEMA,
        mode=mode,
        max_rows_per_file=rows_per_file,
        storage_options=storage_options,
    )


def _address_answers(address: str, timeout_s: float, named_by: str = "RAY_ADDRESS") -> None:
    """Raise :class:`ConversionError` unless something accepts a TCP connection at ``address`` in time.

    The time is ``timeout_s``: ``ray.init`` retries an address with no cluster for ten minutes and more
    (ray#22413). ``named_by``: where the address came from, for the message.
    """
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    what = f"no Ray cluster answers at {address} ({named_by})"
    todo = (
        "start one there (ray start --head --port=PORT), point RAY_ADDRESS at a running head, or unset "
        "RAY_ADDRESS to run on a local Ray"
    )
    if not host or not port.isdigit():
        raise ConversionError(f"{named_by} {address!r} is not HOST:PORT; {todo}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except TimeoutError:
        raise ConversionError(f"{what} within {timeout_s:g} s; {todo}") from None
    except OSError as e:
        raise ConversionError(f"{what}: {e.strerror or e}; {todo}") from None


def _auto_address() -> str | None:
    """The address ``RAY_ADDRESS=auto`` means to Ray.

    It is in the ``ray_current_cluster`` file that the last ``ray start --head`` of this machine wrote in
    Ray's temp dir (``ray/`` under ``$RAY_TMPDIR``, ``$TMPDIR`` or ``/tmp``; read with Ray's own
    ``ray._private.utils.read_ray_address``); ``None`` if there is none, or if this Ray has no such
    function (Ray then decides).
    """
    try:
        from ray._private.utils import read_ray_address
    except ImportError:
        return None
    try:
        return read_ray_address() or None
    except OSError:
        return None


def connect(timeout_s: float) -> bool:
    """Make this process a Ray driver; return True when it was not one already (the caller shuts Ray down).

    With ``RAY_ADDRESS`` set, join that cluster once its address answers within ``timeout_s``; with
    ``RAY_ADDRESS=auto``, the same for the address of the ``ray_current_cluster`` file that the last
    ``ray start --head`` left (with no such file Ray fails at once, "Could not find any running Ray
    instance"). Without ``RAY_ADDRESS``, start a local Ray: ``address="local"``, because Ray's default would
    follow a ``ray_current_cluster`` file that a dead ``ray start --head`` left behind and wait for that
    cluster indefinitely.

    Token authentication (Ray 2.59+): joining ``RAY_ADDRESS=HOST:PORT`` with ``RAY_AUTH_MODE`` unset turns
    it on when this machine has a token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``), as ``ray start --head`` does for its cluster; Ray itself does that only for
    ``auto`` (ray-project/ray#64755). A failure to join then says what to set.

    Raises
    ------
    ConversionError
        Nothing answers at the address within ``timeout_s``, or Ray cannot start or join (one line; for a
        cluster, naming ``RAY_AUTH_MODE=token`` and where the token goes).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    token_auth = False
    if address not in ("", "auto", "local"):
        _address_answers(address, timeout_s)
        token_auth = _token_auth_as_the_head_would()
    elif address == "auto" and (found := _auto_address()):
        _address_answers(found, timeout_s, "RAY_ADDRESS=auto: Ray's ray_current_cluster file")
    try:
        with warnings.catch_warnings():
            # ray.init starts its services with fork+exec; lance's fork warning is for forked workers
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
        where = f"the Ray cluster at {address} (RAY_ADDRESS)" if address else "a local Ray"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if address not in ("", "local"):
            hint = TOKEN_HINT if token_auth else NO_TOKEN_HINT
        raise ConversionError(f"cannot start or join {where}: {first}{hint}") from None
    return True


# Ray's token authentication (ray-project/ray#64755, Ray 2.59+): `ray start --head` turns it on when it finds
# a token on its machine, but ray.init(address=...) leaves it off for an explicit address, so a driver on
# that same machine was refused and Ray said only "Failed to connect to Ray cluster" after ~23 s.
TOKEN_PLACES = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
NO_TOKEN_HINT = (
    "; if the cluster uses token authentication (ray start --head turns it on when its machine has a token), "
    f"set RAY_AUTH_MODE=token and give this machine the cluster's token ({TOKEN_PLACES})"
)
TOKEN_HINT = f"; token authentication is on here: the token found ({TOKEN_PLACES}) must be the cluster's"


def _token_auth_as_the_head_would() -> bool:
    """Turn Ray's token authentication on for this driver as ``ray start --head`` does for the head.

    That is when ``RAY_AUTH_MODE`` is unset and this machine has a token (Ray's own
    ``maybe_enable_token_auth_if_token_available``: it sets ``RAY_AUTH_MODE=token`` in this process's
    environment); return whether token authentication is on. A cluster without authentication ignores the
    token. An explicit ``RAY_AUTH_MODE`` is left as it is; a Ray without token authentication: False.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def write_fragments_ray(
    records: Iterable[Record],
    target: str,
    *,
    mode: str,
    rows_per_file: int,
    storage_options: dict[str, str] | None,
    block_rows: int,
    max_rows: int | None,
    skip_invalid: bool,
    progress: Any,
    description: str,
    fragment_bytes: int = FRAGMENT_BYTES,
    max_in_flight: int | None = None,
    connect_timeout_s: float = 60.0,
    block_bytes: int = BATCH_BYTES,
) -> Written:
    """Check and write ``records`` on Ray; return what was written (fragments in source order), uncommitted.

    Same contract as ``engine="local"`` (:mod:`data_prep.engine`): raises :class:`InvalidImage` for
    the first invalid record (in source order) unless ``skip_invalid``, which lists it in the result's
    ``skipped`` instead; raises :class:`ConversionError` when no row is valid. At most ``max_in_flight``
    blocks (default: twice the cluster's CPUs) are checked at a time, so the driver and the object store hold
    a bounded part of the source however large it is. Ray is joined or started by :func:`connect`
    (``connect_timeout_s``). ``progress``: a tqdm bar, one step per record.
    """
    import ray

    started = connect(connect_timeout_s)
    try:
        if max_in_flight is None:
            max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        blocks = batched(records, block_rows, block_bytes)
        writers = _Writers(target, mode, rows_per_file, storage_options, fragment_bytes, max_in_flight)
        written = Written()
        with closing(_checked_in_order(blocks, max_in_flight)) as checked:
            try:
                for n, outcomes_ref, rows_ref in checked:
                    taken_bytes = _count(ray.get(outcomes_ref), written, max_rows, skip_invalid, progress)
                    progress.update(n)
                    writers.add(rows_ref, *taken_bytes)
                    if max_rows is not None and written.rows >= max_rows:
                        break
                writers.flush()
                written.require_rows(description)
                written.fragments = writers.fragments()
                return written
            except BaseException:
                writers.cancel()
                raise
    finally:
        if started:
            ray.shutdown()


def _checked_in_order(blocks: Iterator[list[Record]], max_in_flight: int) -> Iterator[tuple]:
    """``(records, outcomes_ref, rows_ref)`` of a ``_check_block`` task per block, in source order.

    At most ``max_in_flight`` tasks are started ahead; closing it cancels the tasks not yet yielded (blocks
    past ``max_rows``, or after a failure).
    """
    import ray

    check = ray.remote(_check_block).options(num_returns=2)
    settings = pil_settings()  # the driver's pixel limit, for every task
    checking: deque = deque()
    try:
        for block in blocks:
            checking.append((len(block), *check.remote(block, settings)))
            if len(checking) >= max_in_flight:
                yield checking.popleft()
        while checking:
            yield checking.popleft()
    finally:
        for _, outcomes_ref, _ in checking:
            ray.cancel(outcomes_ref)


def _count(
    outcomes: list[Any], written: Written, max_rows: int | None, skip_invalid: bool, progress: Any
) -> tuple[int, int]:
    """Count one block's valid rows into ``written``, up to ``max_rows`` in all.

    An invalid one is raised or skipped (:meth:`Written.skip`). Returns how many rows of the block to write
    and their image bytes.
    """
    taken = taken_bytes = 0
    for outcome in outcomes:
        if isinstance(outcome[0], str):
            written.skip(InvalidImage(*outcome), skip_invalid, progress)
            continue
        if max_rows is not None and written.rows >= max_rows:
            break
        label, n_bytes = outcome
        written.add(label, n_bytes)
        taken += 1
        taken_bytes += n_bytes
    return taken, taken_bytes


@dataclass
class _Writers:
    """The ``_write_rows`` tasks of a conversion, in source order.

    The valid rows of consecutive blocks are grouped until ``rows_per_file`` rows or ``fragment_bytes`` of
    images, then written by one task, with at most ``max_in_flight`` tasks unfinished.
    """

    target: str
    mode: str
    rows_per_file: int
    storage_options: dict[str, str] | None
    fragment_bytes: int
    max_in_flight: int
    tasks: list = field(default_factory=list)  # every write task, in source order
    _unfinished: list = field(default_factory=list)  # those not known to be done
    _group: list = field(default_factory=list)  # (rows_ref, rows taken) of blocks not yet handed to a task
    _group_rows: int = 0
    _group_bytes: int = 0
    _first_id: int = 0  # the id of the group's first row
    _remote: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        import ray

        self._remote = ray.remote(_write_rows)

    def add(self, rows_ref, taken: int, taken_bytes: int) -> None:
        """Write the first ``taken`` rows of a checked block (``rows_ref``), after those added before."""
        if taken:
            self._group.append((rows_ref, taken))
            self._group_rows += taken
            self._group_bytes += taken_bytes
            if self._group_rows >= self.rows_per_file or self._group_bytes >= self.fragment_bytes:
                self.flush()

    def flush(self) -> None:
        """Hand the group to a write task, once fewer than ``max_in_flight`` are unfinished."""
        import ray

        if self._group:
            while len(self._unfinished) >= self.max_in_flight:  # writers behind: let them catch up
                _, self._unfinished = ray.wait(self._unfinished, num_returns=1, fetch_local=False)
            refs, takes = zip(*self._group, strict=True)
            options = (self.mode, self.rows_per_file, self.storage_options)
            task = self._remote.remote(self.target, self._first_id, list(takes), *options, *refs)
            self.tasks.append(task)
            self._unfinished.append(task)
            self._first_id += self._group_rows
        self._group, self._group_rows, self._group_bytes = [], 0, 0

    def fragments(self) -> list:
        """The ``FragmentMetadata`` of every task, in source order, once all are done."""
        import ray

        return [fragment for fragments in ray.get(self.tasks) for fragment in fragments]

    def cancel(self) -> None:
        """Cancel every task and wait (up to 120 s) until none runs.

        A cancelled write may still be running, and nothing may land in ``target`` after a failed conversion
        returns.
        """
        import ray

        for ref in self.tasks:
            ray.cancel(ref)
        if self.tasks:
            ray.wait(self.tasks, num_returns=len(self.tasks), timeout=120, fetch_local=False)
