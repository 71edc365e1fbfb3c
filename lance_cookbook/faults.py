"""Injecting a fault into a run launched by ``torch.distributed.run``: find one rank's process and kill it
at a known step, as a preempted node or an OOM-killed process would die.

The training script cooperates through ``LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT=E:S`` (see
:mod:`lance_cookbook.train`): every rank sleeps once the checkpoint after step ``S`` of epoch ``E`` is
saved, so the kill lands at that step whatever the machine's speed, and the test or chapter that kills it
needs no timing. These helpers live in the package, not in a notebook, so tests and chapters share them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

__all__ = ["PAUSE_ENV", "pause_env", "rank_process", "kill_rank_when_paused"]

PAUSE_ENV = "LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT"


def pause_env(epoch: int, step: int) -> dict[str, str]:
    """The environment entry that makes every rank pause after the checkpoint of ``step`` in ``epoch``.

    The script saves mid-epoch checkpoints every ``--checkpoint-every`` steps only, so ``step`` must be a
    multiple of it (and not the epoch's last step, which is saved as the next epoch's start).
    """
    return {PAUSE_ENV: f"{epoch}:{step}"}


def rank_process(launcher_pid: int, rank: int, module: str = "lance_cookbook.train") -> psutil.Process | None:
    """The process of global rank ``rank`` among the descendants of a ``torch.distributed.run`` launcher.

    A rank is recognised by its command line (it runs ``module``) and its ``RANK`` environment variable,
    which ``torch.distributed.run`` sets for each worker it starts: never by a process name, which every
    rank and every DataLoader worker share.

    Parameters
    ----------
    launcher_pid : int
        Pid of the ``python -m torch.distributed.run`` process (``subprocess.Popen(...).pid``).
    rank : int
        Global rank, ``0 .. world_size - 1``.
    module : str
        The module the ranks run; DataLoader workers (``multiprocessing`` children) do not match it.

    Returns
    -------
    psutil.Process or None
        ``None`` while the launcher has not (re)started that rank.
    """
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if module in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a process that ended while we looked, or one not ours to inspect
    return None


def kill_rank_when_paused(
    launcher: subprocess.Popen, checkpoint: str | os.PathLike, rank: int, *, give_up_s: float = 600.0
) -> int:
    """Wait until ``checkpoint`` exists (the ranks pause right after writing it), then SIGKILL ``rank`` and
    its DataLoader workers.

    SIGKILL, because a preempted or OOM-killed process gets no chance to clean up either: no handler
    runs, no file is closed. ``torch.distributed.run`` then sees a failed worker, stops the others and,
    with ``--max-restarts``, starts all ranks again; they resume from the newest checkpoint.

    Parameters
    ----------
    launcher : subprocess.Popen
        The ``torch.distributed.run`` process, started with :func:`pause_env` in its environment.
    checkpoint : path
        The checkpoint file the pause follows (:func:`lance_cookbook.checkpoint.checkpoint_name`).
    rank : int
        Global rank to kill.
    give_up_s : float
        A safety net against a run that hangs, not a measurement: raise after this many seconds.

    Returns
    -------
    int
        The pid that was killed.

    Raises
    ------
    RuntimeError
        The launcher ended before the checkpoint appeared, or ``give_up_s`` passed.
    """
    checkpoint = Path(checkpoint)
    deadline = time.monotonic() + give_up_s
    while True:
        if launcher.poll() is not None:
            raise RuntimeError(f"the run ended (exit {launcher.returncode}) before {checkpoint} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {give_up_s:.0f} s: no {checkpoint}, or no rank {rank} found")
        target = rank_process(launcher.pid, rank) if checkpoint.exists() else None
        if target is not None:
            try:
                workers = target.children(recursive=True)
            except psutil.NoSuchProcess:
                workers = []
            os.kill(target.pid, signal.SIGKILL)
            # Its DataLoader workers go with it, as on a lost node. Left alone, a worker whose parent died
            # with batches still queued can block for ever at exit, joining its queue's feeder thread: it
            # holds the pipe's reading end itself, so the write never fails. It would outlive the run and
            # keep the launcher's stdout open.
            for worker in workers:
                try:
                    worker.kill()
                except psutil.NoSuchProcess:
                    pass
            return target.pid
        time.sleep(0.1)
