"""Conversion speed and memory: one image-folder conversion timed in a fresh interpreter, its RSS its own.

The conversion under test lives in ``data_prep``, beside this package rather than in it, so that the recipe
in ``lance_cookbook`` can be copied alone. Only the child process imports it: the parent runs this file by
path (``python -P conversion.py SPEC``), so neither the package nor torch loads in the child and its memory
figures are the conversion's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["convert_in_child"]

_REPO = Path(__file__).resolve().parents[2]  # where the data_prep package sits beside lance_cookbook


def convert_in_child(folder: str, output: str, *, progress: bool) -> dict[str, Any]:
    """Convert the image folder ``folder`` into the Lance dataset ``output`` (replacing it) in a fresh
    interpreter.

    Returns
    -------
    dict
        ``rows``, ``seconds`` and ``images_per_s`` of the conversion itself (imports excluded),
        ``image_bytes``, ``disk_bytes``, ``rss_before`` and ``rss_after`` (bytes resident after the imports
        and after the conversion) and ``peak_rss`` (the child's peak resident bytes, sampled every 10 ms).

    Raises
    ------
    RuntimeError
        If the conversion fails; its own error is on stderr, which the child shares with this process.
    """
    from .measure import PeakRSS  # here, not at the top: the child runs this file outside the package

    path = os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    spec = {"source": f"imagefolder:{folder}", "output": output, "overwrite": True, "progress": progress}
    proc = subprocess.Popen(
        [sys.executable, "-P", __file__, json.dumps(spec)],  # -P: this folder's modules shadow nothing
        env=dict(os.environ, PYTHONPATH=path),
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
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
    if proc.returncode != 0:
        raise RuntimeError(f"conversion of {folder} failed (exit {proc.returncode})")
    out = json.loads(stdout.strip().splitlines()[-1])
    out["peak_rss"] = max(rss.peaks.get(proc.pid, 0), out["rss_before"], out["rss_after"])
    out["images_per_s"] = out["rows"] / out["seconds"] if out["seconds"] else float("inf")
    return out


def _child(spec_json: str) -> None:
    import psutil

    spec = json.loads(spec_json)
    from data_prep.convert import convert

    rss_before = psutil.Process().memory_info().rss
    summary = convert(spec["source"], spec["output"], overwrite=spec["overwrite"], progress=spec["progress"])
    figures = {
        "rows": summary.rows,
        "seconds": summary.seconds,
        "image_bytes": summary.image_bytes,
        "disk_bytes": summary.disk_bytes,
        "rss_before": rss_before,
        "rss_after": psutil.Process().memory_info().rss,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    _child(sys.argv[1])
