"""Process figures: CPU seconds and resident memory (RSS) of this process and its workers, through psutil.

psutil reads them the same way on Linux and macOS. It has no peak RSS there (Linux's ``VmHWM`` cannot be
read through it, and ``getrusage`` cannot be reset between loaders), so :class:`PeakRSS` samples the RSS
of the processes under test while they run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

import psutil

__all__ = ["MiB", "PeakRSS", "cpu_seconds", "rss_bytes"]

MiB = 1024 * 1024


def _process(pid: int | None) -> psutil.Process:
    return psutil.Process(os.getpid() if pid is None else pid)


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of process ``pid`` (default: this one), all its threads.

    ``None`` if it is gone or may not be read.
    """
    try:
        times = _process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return times.user + times.system


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size in bytes of process ``pid`` (default: this one).

    ``None`` if it is gone or may not be read.
    """
    try:
        return _process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class PeakRSS:
    """Peak RSS in bytes of a set of processes while a ``with`` block runs, sampled from a thread.

    Parameters
    ----------
    pids
        Process ids to watch (``None`` stands for this process), or a callable returning them, asked at
        every sample so that processes started inside the block are watched too.
    interval
        Seconds between samples. One sample costs tens of microseconds per process; a peak shorter than
        ``interval`` can be missed, so the figure is a lower bound of the true peak.

    ``peaks`` maps each pid seen (this process as ``None``) to its largest sample; it is sampled once when
    the block starts and once when it ends, so even a short block has a figure.
    """

    def __init__(
        self, pids: Iterable[int | None] | Callable[[], Iterable[int | None]], interval: float = 0.01
    ):
        self._pids = pids if callable(pids) else (lambda fixed=list(pids): fixed)
        self.interval = interval
        self.peaks: dict[int | None, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one RSS sample of every watched process and keep each one's peak."""
        for pid in self._pids():
            rss = rss_bytes(pid)
            if rss is not None and rss > self.peaks.get(pid, 0):
                self.peaks[pid] = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
