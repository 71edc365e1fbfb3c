"""Start methods safe with Lance: forkserver or spawn, never fork. Torch-free: ``data_prep.pool`` uses it."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import select
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["check_start_method", "lance_safe_context", "end_with_process", "LOADER_PRELOAD"]

# What DataLoader workers import before they can run a collate: loaded once by the fork server instead of
# by every worker (start-up figures: docs/benchmark.md, "Worker start-up and per-row read costs").
LOADER_PRELOAD = ("torch", "torchvision", "torchcodec", "PIL", "numpy")


def check_start_method(context: str | Any) -> Any:
    """Return a multiprocessing context that is safe with Lance (lance#3640, lance#2204).

    Raises
    ------
    ValueError
        For the ``fork`` start method (by name or as a context).
    """
    ctx = multiprocessing.get_context(context) if isinstance(context, str) or context is None else context
    if ctx.get_start_method() == "fork":
        raise ValueError(
            "the 'fork' start method is not safe with Lance (lance#3640): use 'forkserver' or 'spawn'"
        )
    return ctx


def lance_safe_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """Return ``forkserver`` (spawn where missing) preloading ``preload``, never ``lance`` or ``__main__``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    theirs = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_preload_modules", None) or []
    keep = [m for m in theirs if m != "__main__" and m != "lance" and not m.startswith("lance.")]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(keep + [m for m in preload if m not in keep])
    return context


def end_with_process(pid: int, *, poll_s: float = 0.5) -> threading.Thread:
    """In a worker process: end this process (``os._exit(1)``) as soon as process ``pid`` ends.

    Watched through a ``pidfd`` where Linux has one, else polled; why: docs/training.md.

    Parameters
    ----------
    pid : int
        The process whose end ends this one.
    poll_s : float
        Seconds between checks without a ``pidfd``.

    Returns
    -------
    threading.Thread
        The daemon thread that watches (already started).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # it died before this worker got here
        os._exit(1)
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has ended
        else:
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # alive, owned by someone else
                    pass
                time.sleep(poll_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name=f"end-with-{pid}", daemon=True)
    thread.start()
    return thread
