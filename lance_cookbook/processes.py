"""Child processes that end with the process that started them (Linux ``prctl(PR_SET_PDEATHSIG)``).

Torch-free: the notebooks' command runner and the benchmark's subprocesses use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["end_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` for ``subprocess.Popen`` that sends the child ``sig`` when its starter dies.

    A notebook that launches ``torch.distributed.run`` or a conversion and is then killed (the OOM killer,
    Kernel > Restart) would otherwise leave that command running, reparented to init. SIGTERM by default,
    so a launcher stops its ranks and a training run writes its checkpoint. The signal follows the *thread*
    that started the child: start it from one that outlives it (the main thread, as a notebook cell does).

    Parameters
    ----------
    sig : int
        The signal the child gets, SIGKILL of the parent included.

    Returns
    -------
    callable or None
        Pass it as ``preexec_fn``; ``None`` (nothing to do) outside Linux.
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
