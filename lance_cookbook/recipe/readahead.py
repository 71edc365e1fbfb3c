"""Read-ahead for remote data: each worker reads its next batches while it decodes the current one.

A ``take`` from object storage waits about two round trips, and a DataLoader worker holds one batch at a
time, so at 50 ms a request the workers mostly wait. ``DataLoader`` (``in_order=True``) hands batch ``k`` to
worker ``k % num_workers``: :class:`ReadAheadBatchSampler` sends, with batch ``k``, the indices of the batches
the same worker gets next (``k + W``, ``k + 2W``, ...), and :class:`ReadAhead`, in the worker, reads them in
the background, several batches to one ``take``: a take of 8 batches waits only a few more round trips
than a take of one, and reads once what neighbouring rows share. Order, ``len()`` and the sampler are
untouched: a batch holds the same rows, read the same way. Figures: docs/object_storage_traffic.md.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["REMOTE_READ_AHEAD", "HintedBatch", "ReadAheadBatchSampler", "ReadAhead"]

# batches each worker reads ahead by default from object storage (make_loader's read_ahead): at 50 ms a
# request 16 beat 8 in random and in block order, and 32 gained only on rows scattered over a larger dataset,
# at twice the memory (docs/object_storage_traffic.md)
REMOTE_READ_AHEAD = 16

Key = tuple[str, int]  # (the pass, the batch's number in it)


class HintedBatch(list):
    """A batch's indices; ``key``; ``ahead``, ``(key, indices)`` of its worker's next batches; ``depth``."""

    def __init__(self, indices: Iterable[int], key: Key, ahead: list[tuple[Key, list[int]]], depth: int):
        super().__init__(indices)
        self.key, self.ahead, self.depth = key, ahead, depth

    def __reduce__(self):
        return (HintedBatch, (list(self), self.key, self.ahead, self.depth))


class ReadAheadBatchSampler:
    """Yield ``batch_sampler``'s batches as :class:`HintedBatch`, each naming its worker's next ``depth``.

    Draws up to ``depth * num_workers`` batches from ``batch_sampler`` before the DataLoader asks for them
    (indices only); a sampler whose state counts what it yielded would count them early (the recipe's
    samplers count steps, not draws).

    Parameters
    ----------
    batch_sampler : iterable of list of int
        The DataLoader's batch sampler (``BatchSampler(sampler, batch_size, drop_last)``).
    depth : int
        Batches of its own each worker may read ahead, >= 1.
    num_workers : int
        The DataLoader's workers, >= 1: batch ``k`` goes to worker ``k % num_workers``.
    """

    def __init__(self, batch_sampler: Iterable[Sequence[int]], depth: int, num_workers: int):
        if depth < 1 or num_workers < 1:
            raise ValueError(f"depth and num_workers must be >= 1, got {depth} and {num_workers}")
        self.batch_sampler, self.depth, self.num_workers = batch_sampler, depth, num_workers

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[HintedBatch]:
        token = os.urandom(8).hex()  # a new pass: what a worker holds from an older one is dropped
        span = self.depth * self.num_workers
        window: deque[list[int]] = deque()
        k = 0
        for batch in self.batch_sampler:
            window.append(list(batch))
            if len(window) > span:
                yield self._hinted(token, k, window)
                window.popleft()
                k += 1
        while window:
            yield self._hinted(token, k, window)
            window.popleft()
            k += 1

    def _hinted(self, token: str, k: int, window: deque[list[int]]) -> HintedBatch:
        ahead = [((token, k + j), window[j]) for j in range(self.num_workers, len(window), self.num_workers)]
        return HintedBatch(window[0], (token, k), ahead, self.depth)


class ReadAhead:
    """In a worker: serve :class:`HintedBatch` es, reading the batches they announce in the background.

    ``read(batches)`` reads several batches in one go (one ``take``) and returns one result per batch.
    When half the announced batches are not yet asked for, one background ``read`` fetches them: at most
    ``depth`` batches are held or in flight besides the one being served. A held batch that is not among
    the current batch's announced ones is dropped (another pass, another order). A background read that
    failed is not reported: the batch is read again on its own, so an error surfaces on the batch whose
    rows cause it, with the message a plain read gives. Threads (at most 2) start with the first batch and
    end with the process (a DataLoader worker ends with its loader).
    """

    def __init__(self, read: Callable[[list[list[int]]], list[Any]], per_read: int | None = None):
        self.read, self.per_read, self.depth = read, per_read, 1
        self._held: dict[Key, tuple[Future, int, list[int]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def in_flight(self) -> int:
        """Return how many batches are held or being read ahead (at most ``depth``)."""
        return len(self._held)

    def __call__(self, batch: HintedBatch) -> Any:
        """Return ``read([batch])[0]``, from a background read when one has it."""
        self.depth = batch.depth
        per_read = self.per_read or max(1, self.depth // 2)
        announced = {key for key, _ in batch.ahead}
        for key in [key for key in self._held if key not in announced and key != batch.key]:
            del self._held[key]
        held = self._held.pop(batch.key, None)
        todo = [(key, indices) for key, indices in batch.ahead if key not in self._held]
        # a full window's second half, or the pass's last batches
        if todo and (len(todo) >= per_read or len(batch.ahead) < self.depth):
            self._start(todo[: self.depth - len(self._held)], per_read)
        if held is not None and held[2] == list(batch):
            future, slot, _ = held
            try:
                return future.result()[slot]
            except Exception:  # noqa: BLE001 - read again below: its own error, on its own batch
                pass
        return self.read([list(batch)])[0]

    def _start(self, todo: list[tuple[Key, list[int]]], per_read: int) -> None:
        if not todo:
            return
        if self._pool is None:  # sized by the first batch's depth
            workers = -(-self.depth // per_read)
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lance-read-ahead")
        for at in range(0, len(todo), per_read):
            part = todo[at : at + per_read]
            future = self._pool.submit(self.read, [indices for _, indices in part])
            for slot, (key, indices) in enumerate(part):
                self._held[key] = (future, slot, indices)
