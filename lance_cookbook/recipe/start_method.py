"""Start methods that are safe with Lance: forkserver (workers in milliseconds) or spawn, never fork.

Torch-free on purpose: the conversion's checking pool (``data_prep.pool``) uses it too, and must not pay
for importing torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "check_start_method",
    "lance_safe_context",
    "end_with_process",
    "end_with_parent",
    "LOADER_PRELOAD",
]

# What DataLoader workers import before they can run a collate: loaded once by the fork server instead of
# by every worker. Measured: a second loader's first batch in 0.48 s instead of 2.9-3.0 s with spawn
# (docs/benchmark.md, "Worker start-up and per-row read costs").
LOADER_PRELOAD = ("torch", "torchvision", "PIL", "numpy")


def check_start_method(context: str | Any) -> Any:
    """Return a multiprocessing context that is safe with Lance, or raise for ``fork``.

    Lance's Rust runtime holds threads and locks that a forked child inherits in an unknown state
    (deadlocks and segfaults: lance#3640, lance#2204), so only ``spawn`` and ``forkserver`` are allowed.

    Raises
    ------
    ValueError
        For the ``fork`` start method (by name or as a context).
    """
    ctx = multiprocessing.get_context(context) if isinstance(context, str) or context is None else context
    method = ctx.get_start_method()
    if method == "fork":
        raise ValueError(
            "the 'fork' start method is not safe with Lance (a forked worker inherits the Lance runtime's "
            "threads and locks and can deadlock or segfault); use multiprocessing_context='forkserver' "
            "(default where the platform has it) or 'spawn'"
        )
    return ctx


def lance_safe_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn``; ``preload`` added to the
    fork server's preload list.

    A spawned worker is a fresh interpreter that imports everything again (about 3 s for a DataLoader
    worker that needs torch, docs/benchmark.md); a forkserver worker is forked in milliseconds from a
    server that imported ``preload`` once. The server must never hold Lance: a process that imported Lance
    must not fork (lance#3640), one that imports it after the fork server started is safe (lance#3727). So
    ``lance`` and ``__main__`` (a script's ``__main__`` may import Lance) are removed from the preload list,
    which is this process's (``multiprocessing.set_forkserver_preload``) and is read from a private
    attribute (CPython 3.4-3.14; without it, ``preload`` alone is used). Once the server runs, its preload
    stays as it was: a later caller's modules are then imported by each worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    theirs = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_preload_modules", None) or []
    keep = [m for m in theirs if m != "__main__" and m != "lance" and not m.startswith("lance.")]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(keep + [m for m in preload if m not in keep])
    return context


def end_with_process(pid: int, *, poll_s: float = 0.5) -> threading.Thread:
    """In a worker process: end this process (``os._exit(1)``) as soon as process ``pid`` ends.

    A DataLoader worker notices that its training process died by watching its *parent* pid
    (``torch.utils.data._utils.worker.ManagerWatchdog``, pytorch/pytorch#6606). Under ``forkserver`` its
    parent is the fork server, which outlives a SIGKILLed training process; and the fork server exits only
    when the last holder of its "alive" pipe is gone, which every worker is. So after an OOM kill of a rank
    or of a Jupyter kernel, the fork server (~815 MiB with torch preloaded) and its workers (~670 MiB each)
    lived on for ever and kept the launcher's stdout open (``../shared/GUIDE.md``, measured 2026-12-03).
    Watching the process that started the worker instead ends both: the workers leave, then the fork server
    reads EOF on its pipe and exits.

    ``os._exit``, not ``sys.exit``: a worker whose reader is gone can block for ever joining its queue's
    feeder thread at a normal exit. On Linux 5.3+ the watch is a ``pidfd`` (woken at the death itself, no
    polling); elsewhere ``pid`` is polled every ``poll_s`` seconds.

    Parameters
    ----------
    pid : int
        The process whose end ends this one: the one that started the workers (``os.getpid()`` there).
    poll_s : float
        Seconds between checks where there is no ``pidfd``.

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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the process that started it
    dies, SIGKILL included (Linux ``prctl(PR_SET_PDEATHSIG)``); ``None`` (nothing to do) elsewhere.

    A notebook that launches ``torch.distributed.run`` or a conversion and is then killed (the OOM killer,
    Kernel > Restart of a hung kernel) would otherwise leave that command running for hours, reparented to
    init. SIGTERM by default, so a launcher stops its ranks and a training run writes its checkpoint.
    The signal follows the *thread* that started the child: start it from a thread that outlives it (the
    main thread, as a notebook cell does).

    Returns
    -------
    callable or None
        Pass it as ``preexec_fn``.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: no signal would come
            os.kill(os.getpid(), sig)

    return preexec
