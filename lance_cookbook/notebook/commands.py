"""Run a command from a notebook with its output shown in the cell, also under nbconvert and nbmake.

A child process writes to the kernel's file descriptors, which Jupyter's executors do not capture: run
with plain ``subprocess.run``, a conversion's summary or a training log appears in an interactive session
but is missing from the executed notebook (``build/``, the site). Here the output comes through a pipe
and is printed line by line as it arrives.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from ..processes import end_with_parent

__all__ = ["start_command", "run_command"]


def start_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` with its stdout and stderr, merged, echoed to this process's stdout by a thread.

    The command gets SIGTERM if this process dies
    (:func:`lance_cookbook.processes.end_with_parent`): a killed notebook kernel leaves no
    launcher or conversion running.

    Parameters
    ----------
    cmd : sequence of str
        The command line, e.g. ``[sys.executable, "-m", "data_prep.convert", ...]``.
    env : mapping, optional
        The child's environment (default: this process's).

    Returns
    -------
    subprocess.Popen
        Wait for it with ``wait()``; its ``echo`` attribute is the echoing thread (joined by
        :func:`run_command`).
    """
    proc = subprocess.Popen(
        list(cmd), env=None if env is None else dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1, preexec_fn=end_with_parent(),
    )  # fmt: skip

    def echo() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    proc.echo = threading.Thread(target=echo, daemon=True)
    proc.echo.start()
    return proc


def run_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end, its output shown as it comes (:func:`start_command`).

    Returns
    -------
    subprocess.CompletedProcess
        With ``returncode`` 0.

    Raises
    ------
    subprocess.CalledProcessError
        The command exited with another code (its output is already shown above).
    """
    proc = start_command(cmd, env)
    code = proc.wait()
    proc.echo.join()
    if code != 0:
        raise subprocess.CalledProcessError(code, list(cmd))
    return subprocess.CompletedProcess(list(cmd), code)
