"""Test hooks and fault injection for tests and chapters; none of it runs in training.

The command line ``python -m lance_cookbook.train`` hands :func:`lance_cookbook.train.main` the hooks its
environment asks for (:func:`hooks_from_env`), as explicit callbacks; ``main`` called from Python gets none:

- ``LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT=E:S`` (:func:`pause_env`): every rank sleeps once the checkpoint
  after step ``S`` of epoch ``E`` is saved, so a kill lands at that step whatever the machine's speed, and
  the test or chapter that kills a rank (:func:`kill_rank_when_paused`) needs no timing;
- ``LANCE_COOKBOOK_SAMPLE_LOG=PATH``: each rank appends ``{"epoch", "position", "index", "world"}`` JSON
  lines for every sample it trained on to ``PATH.rank{R}``.

The rest finds one rank's process and kills it, as a preempted node or an OOM-killed process would die,
and watches a job's processes go. These helpers live in the package, not in a notebook, so tests and
chapters share them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "hooks_from_env",
    "SampleLog",
    "PauseAfterCheckpoint",
    "SAMPLE_LOG_ENV",
    "PAUSE_ENV",
    "JOB_ENV",
    "pause_env",
    "job_env",
    "job_processes",
    "wait_until_gone",
    "wait_until_job_gone",
    "rank_process",
    "kill_rank_when_paused",
    "Kill",
]

PAUSE_ENV = "LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT"
SAMPLE_LOG_ENV = "LANCE_COOKBOOK_SAMPLE_LOG"
JOB_ENV = "LANCE_COOKBOOK_JOB"


class SampleLog:
    """An ``after_step`` hook of :func:`lance_cookbook.train.main` that logs the samples each step trained on.

    Each rank appends one JSON line ``{"epoch", "position", "index", "world"}`` per sample to
    ``PATH.rank{R}``: ``position`` is the sample's place in the epoch's global order, ``index`` its row.

    Parameters
    ----------
    path : str
        The log's path, before ``.rank{R}``.
    """

    def __init__(self, path: str):
        self.path = path
        self.epoch: int | None = None  # the epoch whose order and positions are cached

    def __call__(self, run, sampler, done: int) -> None:
        """Log the samples of step ``done`` of this pass (``run``: the run state; ``sampler``: training's)."""
        if self.epoch != sampler.epoch:  # one pass per epoch in a process: a resumed one starts a process
            self.epoch, self.order = sampler.epoch, sampler.global_order()
            self.positions = sampler.positions()
        b = run.args.batch_size
        with open(f"{self.path}.rank{run.rank}", "a") as f:
            for p in self.positions[(done - 1) * b : done * b]:
                record = {"epoch": sampler.epoch, "position": p, "index": self.order[p], "world": run.world}
                f.write(json.dumps(record, allow_nan=False) + "\n")


class PauseAfterCheckpoint:
    """An ``after_checkpoint`` hook of :func:`lance_cookbook.train.main`: sleep after one checkpoint.

    A test or the chapter kills a rank while every rank sleeps, and ``torch.distributed.run`` then stops the
    others. Should the launcher itself die first (a failed test, an interrupted cell), the rank leaves
    instead of sleeping for ever as an orphan; a SIGTERM (a preemption test) ends the pause too, and the run
    stops after the next step.

    Parameters
    ----------
    at : str
        ``"E:S"``: after the checkpoint of step ``S`` of epoch ``E`` (:func:`pause_env`).
    """

    def __init__(self, at: str):
        self.at = at

    def __call__(self, run, epoch: int, step: int) -> None:
        """Sleep if this checkpoint, of ``step`` in ``epoch``, is the one to pause after.

        Raises
        ------
        SystemExit
            The launcher is gone.
        """
        if self.at != f"{epoch}:{step}":
            return
        run.log(f"paused after the checkpoint of epoch {epoch}, step {step}", flush=True)
        launcher = os.getppid()
        while os.getppid() == launcher and not run.stop.requested:
            time.sleep(0.1)
        if not run.stop.requested:
            raise SystemExit("the launcher is gone: leaving the pause")


def hooks_from_env(environ: dict[str, str] | None = None) -> dict:
    """The hooks ``environ`` (default: ``os.environ``) asks for, as keyword arguments of ``train.main``.

    Returns
    -------
    dict
        ``after_step`` (:class:`SampleLog`) with ``LANCE_COOKBOOK_SAMPLE_LOG``, ``after_checkpoint``
        (:class:`PauseAfterCheckpoint`) with ``LANCE_COOKBOOK_PAUSE_AFTER_CHECKPOINT``; empty without them.
    """
    environ = os.environ if environ is None else environ
    hooks = {}
    if environ.get(SAMPLE_LOG_ENV):
        hooks["after_step"] = SampleLog(environ[SAMPLE_LOG_ENV])
    if environ.get(PAUSE_ENV):
        hooks["after_checkpoint"] = PauseAfterCheckpoint(environ[PAUSE_ENV])
    return hooks


def pause_env(epoch: int, step: int) -> dict[str, str]:
    """The environment entry that makes every rank pause after the checkpoint of ``step`` in ``epoch``.

    The script saves mid-epoch checkpoints every ``--checkpoint-every`` steps only, so ``step`` must be a
    multiple of it (and not the epoch's last step, which is saved as the next epoch's start).
    """
    return {PAUSE_ENV: f"{epoch}:{step}"}


def job_env(marker: str | None = None) -> dict[str, str]:
    """An environment entry that marks every process of a job.

    Put it in the launcher's environment and each process it starts inherits it (ranks, fork servers,
    DataLoader workers), whatever its name or parent. ``marker`` defaults to a fresh random one.
    """
    return {JOB_ENV: marker or uuid.uuid4().hex}


def job_processes(env: dict[str, str]) -> list[psutil.Process]:
    """The live processes whose environment holds the :func:`job_env` entry ``env``.

    Zombies are excluded: they hold no memory and no file.
    """
    ((key, value),) = env.items()
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(key) == value and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # ended while we looked, or not ours to inspect
    return found


def wait_until_gone(processes: Callable[[], list[psutil.Process]], *, give_up_s: float = 30.0) -> float:
    """Wait until ``processes()`` (called again every 0.1 s) returns no process.

    Returns
    -------
    float
        Seconds waited.

    Raises
    ------
    RuntimeError
        Some are still alive after ``give_up_s`` seconds; the message names each (pid, command, RSS).
    """
    start = time.monotonic()
    while True:
        alive = [p for p in processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return time.monotonic() - start
        if time.monotonic() - start > give_up_s:
            described = []
            for p in alive:
                try:
                    described.append(
                        f"{p.pid} ({' '.join(p.cmdline())[:80]}, {p.memory_info().rss >> 20} MiB)"
                    )
                except psutil.Error:
                    continue
            raise RuntimeError(
                f"{len(alive)} process(es) alive after {give_up_s:.0f} s: {'; '.join(described)}"
            )
        time.sleep(0.1)


def wait_until_job_gone(env: dict[str, str], *, give_up_s: float = 30.0) -> float:
    """Wait until no process of the job marked by ``env`` (:func:`job_env`) is alive.

    See :func:`wait_until_gone` for what it returns and raises.
    """
    return wait_until_gone(lambda: job_processes(env), give_up_s=give_up_s)


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


@dataclass
class Kill:
    """What :func:`kill_rank_when_paused` killed, and what it left.

    The rank's own children (its fork server, its DataLoader workers), alive just before the kill.
    """

    pid: int
    left: list[psutil.Process]
    left_rss_bytes: int  # their resident memory just before the kill, in bytes


def kill_rank_when_paused(
    launcher: subprocess.Popen, checkpoint: str | os.PathLike, rank: int, *, give_up_s: float = 600.0
) -> Kill:
    """Wait until ``checkpoint`` exists, then SIGKILL the process of ``rank`` alone.

    The ranks pause right after writing ``checkpoint``.

    SIGKILL of that one pid, as the OOM killer or a crashing CUDA kernel does: no handler runs, no file is
    closed, and its DataLoader workers and fork server are left to notice by themselves (they do:
    :class:`~lance_cookbook.recipe.loader.WorkerInit`).
    ``torch.distributed.run`` then sees a failed worker, stops
    the others and, with ``--max-restarts``, starts all ranks again; they resume from the newest checkpoint.

    Parameters
    ----------
    launcher : subprocess.Popen
        The ``torch.distributed.run`` process, started with :func:`pause_env` in its environment.
    checkpoint : path
        The checkpoint file the pause follows (:func:`lance_cookbook.training.checkpoint.checkpoint_name`).
    rank : int
        Global rank to kill.
    give_up_s : float
        A safety net against a run that hangs, not a measurement: raise after this many seconds.

    Returns
    -------
    Kill
        The pid that was killed, and the processes it had started (to watch them go:
        :func:`wait_until_gone`).

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
            left, rss = [], 0
            for child in target.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                    left.append(child)
                except psutil.Error:
                    continue
            os.kill(target.pid, signal.SIGKILL)
            return Kill(target.pid, left, rss)
        time.sleep(0.1)
