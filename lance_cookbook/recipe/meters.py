"""Data-wait meter: the share of each step spent waiting for the next batch (near 1: the loader limits)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["DataWaitMeter"]

T = TypeVar("T")


class DataWaitMeter:
    """Sum the seconds spent waiting for each batch and of each whole step (``time.perf_counter``).

    A step runs from asking for a batch to asking for the next. ``for x, y in meter.wrap(loader): ...``.

    Attributes
    ----------
    steps : int
        Batches delivered so far.
    wait_s, step_s, last_wait_s, last_step_s : float
        Seconds waiting and of whole steps, summed and of the last step.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every sum and count back to zero."""
        self.steps = 0
        self.wait_s = self.step_s = self.last_wait_s = self.last_step_s = 0.0

    @property
    def wait_fraction(self) -> float:
        """``wait_s / step_s`` in [0, 1]; 0.0 when no step has run."""
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield the items of ``batches`` unchanged, timing each wait and step (a ``break`` keeps them)."""
        iterator = iter(batches)  # before the clock starts: a DataLoader starts its workers here
        start = time.perf_counter()
        for batch in iterator:
            ready = time.perf_counter()
            yield batch
            end = time.perf_counter()  # the body ran between the yield and this line
            self.last_wait_s = ready - start
            self.last_step_s = end - start
            self.wait_s += self.last_wait_s
            self.step_s += self.last_step_s
            self.steps += 1
            start = end
