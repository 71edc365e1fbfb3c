"""Checking records in parallel: threads for small sources, worker processes for large ones.

Results come back in source order, with a bounded number of checks in flight.

PIL's Python-level parsing holds the GIL, so threads barely scale past one core: a source of
``PROCESS_MIN_RECORDS`` or more is checked by :class:`CheckPool` (a ``ProcessPoolExecutor``), a smaller one by
threads, whose start costs nothing.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from lance_cookbook.recipe.start_method import lance_safe_context

from .check import ConversionError, InvalidImage, check_items, init_worker, pil_settings
from .sources import Record

__all__ = [
    "BATCH_BYTES",
    "CheckPool",
    "Checked",
    "batched",
    "checked_batches",
    "checked_records",
    "start_context",
    "usable_cpus",
]

CHECK_CHUNK = 128  # records per task: one task per record costs more than checking a small image
CHECK_CHUNK_BYTES = 4 << 20  # ... and at most this many bytes of images per task (large photos)
# Below this many records threads are as fast: starting and stopping worker processes costs ~0.1 s
PROCESS_MIN_RECORDS = 2_000
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker process: it never waits while the writer writes
MAX_DEFAULT_WORKERS = 8  # default checkers at most: bounds memory in flight (8 x 4 x 4 MiB) on big hosts
# Image bytes per batch (a record batch streamed to Lance, a Ray task's block) by default. A batch is held
# in full while it is checked and turned into Arrow: 512 rows of 3.2 MB photos took 3.4 GB at the peak, of
# 25-30 MB camera JPEGs ~30 GB (datasets#741, the t3-conv-large-images-memory report). 512 small images
# (24 KB: 12 MB) still make one batch.
BATCH_BYTES = 32 << 20

Checked = tuple[Record, bytes | None, tuple[int, int] | InvalidImage]


def _items(records: list[Record]) -> list[str | bytes]:
    """What :func:`data_prep.check.check_items` reads and checks for ``records``.

    A path or the bytes of each record that is not already known to be unusable.
    """
    return [r.path if r.data is None else r.data for r in records if not r.problem]


def _merge(records: list[Record], results: list) -> Iterator[Checked]:
    """``(record, data, (width, height) | InvalidImage)`` per record.

    ``results`` is ``check_items(_items(records))``.
    """
    it = iter(results)
    for record in records:
        if record.problem:
            yield record, None, InvalidImage(record.source, record.problem)
            continue
        result = next(it)
        if isinstance(result, str):
            yield record, None, InvalidImage(record.source, result)
        else:
            data, width, height = result
            yield record, record.data if data is None else data, (width, height)


def checked_records(records: list[Record]) -> list[Checked]:
    """Read and check ``records`` in this thread.

    Used by the thread and Ray paths; CheckPool does the same in worker processes.
    """
    return list(_merge(records, check_items(_items(records))))


def batched(records: Iterable[Record], rows: int, nbytes: int) -> Iterator[list[Record]]:
    """``records`` in order, in lists of at most ``rows`` records and ``nbytes`` bytes of images.

    The bytes counted are each record's bytes, or its file's size; a record larger than ``nbytes`` is in a
    list alone. Records are taken from the source one list at a time, so only one list's images are in
    memory here.
    """
    batch: list[Record] = []
    size = 0
    for record in records:
        record_bytes = 0 if record.problem else _record_bytes(record)
        if batch and size + record_bytes > nbytes:
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += record_bytes
        if len(batch) == rows:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _record_bytes(record: Record) -> int:
    if record.data is not None:
        return len(record.data)
    try:
        return os.stat(record.path).st_size
    except OSError:
        return 0  # the check names the unreadable file


def _chunks(batch: list[Record]) -> Iterator[list[Record]]:
    """``batch`` in order, split into tasks of at most ``CHECK_CHUNK`` records and ``CHECK_CHUNK_BYTES``."""
    chunk: list[Record] = []
    size = 0
    for record in batch:
        nbytes = 0 if record.problem else _record_bytes(record)
        if chunk and (len(chunk) == CHECK_CHUNK or size + nbytes > CHECK_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += nbytes
    if chunk:
        yield chunk


def _checked_by_threads(batches: Iterable[list[Record]], workers: int) -> Iterator[Iterator[Checked]]:
    """Check each batch with threads (PIL releases the GIL only to decode); yield its results in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in batches:
            yield itertools.chain.from_iterable(pool.map(checked_records, _chunks(chunk)))


class CheckPool:
    """Worker processes that read and check records, for sources too large for threads to check quickly.

    A ``ProcessPoolExecutor`` started by :func:`start_context` (forkserver, else spawn; never fork: Lance
    is not fork-safe, lance#3640), each worker set up by :func:`data_prep.check.init_worker` (this
    process's PIL settings; SIGINT ignored, so a Ctrl-C is this process's to handle: :meth:`close` stops
    the workers). As with every spawn or forkserver pool, a script that calls ``convert()`` needs an
    ``if __name__ == "__main__":`` guard. At most
    ``IN_FLIGHT_PER_WORKER`` chunks (each at most ``CHECK_CHUNK`` records and ``CHECK_CHUNK_BYTES``) per
    worker are in flight, so memory stays bounded however large the source is.
    """

    def __init__(self, workers: int):
        self.in_flight = IN_FLIGHT_PER_WORKER * workers
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=start_context(),
            initializer=init_worker,
            initargs=(pil_settings(), os.getpid()),
        )

    def processes(self) -> list[multiprocessing.Process]:
        """The pool's worker processes, to name the one that died.

        ``ProcessPoolExecutor`` keeps them in the private ``_processes`` (pid -> Process; CPython 3.9 to
        3.14) and its ``BrokenProcessPool`` names neither the process nor how it ended. This is the one
        place that reads it; ``tests/test_reliability.py`` fails loudly if CPython changes it.
        """
        return list((getattr(self._pool, "_processes", None) or {}).values())

    def _death(self) -> str:
        """How the pool's dead worker ended, in words."""
        ended = [p for p in self.processes() if p.exitcode is not None]
        # Once one worker dies the pool terminates the others (SIGTERM): prefer the one that did not get that
        ended.sort(key=lambda p: p.exitcode == -signal.SIGTERM)
        if not ended:
            return "a checking worker process died"
        proc, code = ended[0], ended[0].exitcode
        if code < 0:
            how = f"was killed by signal {-code}" + (" (the out-of-memory killer?)" if code == -9 else "")
        elif code == 255 and isinstance(proc, multiprocessing.context.ForkServerProcess):
            # multiprocessing's forkserver Popen reports 255 when the server could not tell it the status
            how = "died (killed, or out of memory? the fork server lost its exit status)"
        else:
            how = f"exited with code {code}"
        return f"a checking worker process (pid {proc.pid}) {how}"

    def checked(self, batches: Iterable[list[Record]]) -> Iterator[Iterator[Checked]]:
        """Yield per batch an iterator over its ``(record, data, (width, height) | InvalidImage)``, in order.

        Later batches are read and checked while the caller consumes the current one. A worker process that
        dies raises :class:`ConversionError` naming the records it was checking.
        """
        parts = (
            (part, i == len(split) - 1)
            for batch in batches
            for split in [list(_chunks(batch))]
            for i, part in enumerate(split)
        )
        pending: deque = deque()  # (records, last of its batch, future), in source order

        def top_up() -> None:
            while len(pending) < self.in_flight:
                part, last = next(parts, (None, None))
                if part is None:
                    return
                try:
                    future = self._pool.submit(check_items, _items(part))
                except BrokenProcessPool as e:  # a worker died already: named where the first part fails
                    future = Future()
                    future.set_exception(e)
                pending.append((part, last, future))

        def batch() -> Iterator[Checked]:
            last = False
            while not last:
                top_up()
                part, last, future = pending.popleft()
                try:
                    results = future.result()
                except BrokenProcessPool:
                    where = f"{part[0].source} to {part[-1].source}"
                    raise ConversionError(f"{self._death()} while checking {where}") from None
                yield from _merge(part, results)

        try:
            while True:
                top_up()
                if not pending:
                    # Every result is in: let the workers exit while the caller writes and commits (a
                    # worker's exit costs ~0.1 s under spawn); close() still waits for them
                    self._pool.shutdown(wait=False)
                    return
                yield batch()
        finally:
            for *_, future in pending:
                future.cancel()

    def close(self) -> None:
        """Stop the workers and return once every one has exited. Idempotent.

        Checks still queued are cancelled (a thread waiting for one gets ``CancelledError`` and leaves);
        those running finish first, which takes one chunk's check: at most ``CHECK_CHUNK`` images.
        """
        self._pool.shutdown(wait=True, cancel_futures=True)


# What a checking worker needs, imported once by the fork server rather than by every worker. Never Lance
# (nor a module that imports it): a process that imported Lance must not fork (lance#3640); one that imports
# it after the fork server started is safe (lance#3727). tests/test_convert_imports.py checks the workers.
FORKSERVER_PRELOAD = ["data_prep.pool"]


def start_context() -> multiprocessing.context.BaseContext:
    """The start method of checking workers: ``forkserver`` where the platform has it, else ``spawn``.

    See :func:`lance_cookbook.recipe.start_method.lance_safe_context`. A spawned worker imports PIL and
    the caller's ``__main__`` again (~0.15 s of CPU each, a tenth of a 20,000-image conversion on 2
    cores); a forked one starts in milliseconds from a server that has them already.
    """
    return lance_safe_context(FORKSERVER_PRELOAD)


def checked_batches(
    records: Iterable[Record],
    *,
    batch_rows: int,
    workers: int | None,
    expected: int | None,
    batch_bytes: int = BATCH_BYTES,
) -> tuple[Iterator[Iterator[Checked]], CheckPool | None]:
    """``records`` cut into batches and checked in parallel.

    Batches hold at most ``batch_rows`` records and ``batch_bytes`` bytes of images (:func:`batched`).
    Returns per batch an iterator over its checked records, in source order, and the :class:`CheckPool`
    doing it (None: threads), for the caller to :meth:`~CheckPool.close`.
    The images held here stay bounded: threads check a batch once the caller has taken the previous one,
    worker processes at most ``IN_FLIGHT_PER_WORKER`` chunks of ``CHECK_CHUNK_BYTES`` each.

    ``workers``: checks at once (default: the usable CPUs, at most ``MAX_DEFAULT_WORKERS``); ``expected``:
    how many records the source will give, if known. Worker processes check a source of
    ``PROCESS_MIN_RECORDS`` or more when ``workers`` is above 1, threads (at most 4 by default) the rest.
    """
    batches = batched(records, batch_rows, batch_bytes)
    processes = workers or min(MAX_DEFAULT_WORKERS, usable_cpus())
    if processes > 1 and expected is not None and expected >= PROCESS_MIN_RECORDS:
        pool = CheckPool(processes)
        return pool.checked(batches), pool
    return _checked_by_threads(batches, workers or min(4, usable_cpus())), None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus
