"""Data-wait meter: how much of each training step is spent waiting for the next batch.

The one figure that says whether the loader is the bottleneck (pytorch/examples ``imagenet/main.py``
measures it as ``data_time``). Wrap any iterable of batches::

    meter = DataWaitMeter()
    for images, labels in meter.wrap(loader):
        ...  # forward, backward, step
    print(f"{meter.wait_fraction:.0%} of the time waiting for data")

A fraction near 0 means the model is the bottleneck and more workers will not help; near 1 means the
GPU (or CPU) sits idle waiting for batches: add workers, decode less, or read faster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["DataWaitMeter"]

T = TypeVar("T")


class DataWaitMeter:
    """Sums, over the steps of a loop, the seconds spent waiting for each batch and the seconds of each
    whole step (wait + the loop body), measured with ``time.perf_counter``.

    A step runs from asking the iterable for a batch to asking for the next one, so the waits and the
    bodies add up to the loop's wall time. The wait that ends the loop (the iterable saying it is
    exhausted) is not a step and is not counted. One meter may wrap several loops; the sums accumulate
    until :meth:`reset`.

    Attributes
    ----------
    steps : int
        Batches delivered so far.
    wait_s : float
        Seconds spent inside ``next()`` of the wrapped iterable, summed over steps.
    step_s : float
        Seconds of whole steps, summed.
    last_wait_s, last_step_s : float
        The most recent step's figures (0.0 before the first step).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every sum and count back to zero."""
        self.steps = 0
        self.wait_s = 0.0
        self.step_s = 0.0
        self.last_wait_s = 0.0
        self.last_step_s = 0.0

    @property
    def wait_fraction(self) -> float:
        """``wait_s / step_s`` in [0, 1]; 0.0 when no step has run (an empty loader waits for nothing)."""
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield the items of ``batches``, timing each wait and each step.

        Parameters
        ----------
        batches : iterable
            A ``DataLoader`` or any iterable.

        Yields
        ------
        object
            The items of ``batches``, unchanged. Leaving the loop early (``break``) is fine: the steps
            completed so far stay counted.
        """
        iterator = iter(batches)
        start = time.perf_counter()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            ready = time.perf_counter()
            yield batch
            end = time.perf_counter()  # the body ran between the yield and this line
            self.last_wait_s = ready - start
            self.last_step_s = end - start
            self.wait_s += self.last_wait_s
            self.step_s += self.last_step_s
            self.steps += 1
            start = end
