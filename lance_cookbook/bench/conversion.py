"""Conversion speed and memory: one image-folder conversion timed by its own command line, in a fresh process.

The conversion lives beside this package rather than in it, so that the recipe in ``lance_cookbook`` can be
copied alone: the benchmark runs its command line (``python -m CONVERT_MODULE``, importable from the
repository root or an installed project) and reads the figures it writes with ``--summary-json``.
Neither this package nor torch loads in the child, so its memory is the conversion's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["convert_in_child"]

CONVERT_MODULE = "data_prep.convert"  # the conversion's command line
# What the conversion imports before it reads an image, measured alone: the baseline of its memory
IMPORTS = "import lance, pyarrow, PIL.Image, tqdm"
_REPO = Path(__file__).resolve().parents[2]  # a checkout's root: the conversion sits beside this package


def _child_env() -> dict[str, str]:
    path = os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path)


def _peak_rss(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``; return its completed process and its peak resident bytes, sampled every 10 ms."""
    from ..processes import end_with_parent
    from .measure import PeakRSS

    proc = subprocess.Popen(
        cmd, env=_child_env(), stdout=subprocess.PIPE, stderr=None, text=True, preexec_fn=end_with_parent()
    )
    # Sampled from here: the child's own getrusage peak would not do, as Linux keeps in it the peak of the
    # process image it was forked from (this one, torch loaded) across exec. Popen returns after the exec.
    try:
        with PeakRSS([proc.pid]) as rss:
            stdout, _ = proc.communicate()
    except BaseException:  # Ctrl-C included: leave no conversion running
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout), rss.peaks.get(proc.pid, 0)


def convert_in_child(
    folder: str, output: str, *, progress: bool, shuffle: int | None = None
) -> dict[str, Any]:
    """Convert the image folder ``folder`` into the Lance dataset ``output`` (replacing it).

    Runs the conversion's command line. ``shuffle``: write the rows in the random order of this seed
    (``--shuffle SEED``, what ``BlockShuffleSampler`` needs for batches of mixed classes), else in
    ``ImageFolder`` order.

    Returns
    -------
    dict
        ``rows``, ``seconds`` and ``images_per_s`` of the conversion itself (start-up excluded),
        ``image_bytes``, ``disk_bytes``, ``peak_rss`` (the child's peak resident bytes, sampled every 10 ms)
        and ``rss_before`` (the peak of a process that only imports what the conversion imports).

    Raises
    ------
    RuntimeError
        If the conversion fails; its own error is on stderr, which the child shares with this process.
    """
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", CONVERT_MODULE, "--source", f"imagefolder:{folder}", "--output", output]
        cmd += ["--overwrite", "--summary-json", str(summary)] + ([] if progress else ["--no-progress"])
        cmd += [] if shuffle is None else ["--shuffle", str(shuffle)]
        done, peak = _peak_rss(cmd)
        if done.returncode != 0:
            raise RuntimeError(f"conversion of {folder} failed (exit {done.returncode})")
        out = json.loads(summary.read_text())
    _, imports = _peak_rss([sys.executable, "-c", IMPORTS])
    figures = {k: out[k] for k in ("rows", "seconds", "image_bytes", "disk_bytes", "images_per_s")}
    return figures | {"rss_before": imports, "peak_rss": max(peak, imports)}
