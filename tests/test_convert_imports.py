"""The conversion stays light: neither its command nor its checking workers import torch.

``lance_cookbook`` exports lazily (PEP 562) so that ``data_prep`` can use its torch-free helpers
(``cli``, ``disk_usage``, ``object_store``); an eager import there cost the conversion ~1 GB of memory and
every spawn worker ~3 s. Checked in fresh processes: this test session has imported torch already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, make_imagefolder

# The modules a checking worker must not load: each costs seconds of start-up or hundreds of MB per worker
HEAVY = ("torch", "torchvision", "lance", "pyarrow", "datasets", "sklearn", "ray", "pandas")

CHILD = """
import json, sys
import data_prep.convert  # as `python -m data_prep.convert` does: spawn workers import __main__ again
from data_prep import pool

HEAVY = {heavy!r}


def heavy_loaded():
    return sorted(m for m in HEAVY if m in sys.modules)


if __name__ == "__main__":
    checker = pool.CheckPool(1)
    try:
        # the pool's own executor, so the worker starts exactly as the conversion's do
        in_worker = checker._pool.submit(heavy_loaded).result()
    finally:
        checker.close()
    code = data_prep.convert.main(sys.argv[1:])
    print(json.dumps({{"code": code, "worker": in_worker, "torch": "torch" in sys.modules}}))
"""


def _run(script: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_conversion_and_its_workers_import_no_torch(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "folder")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(heavy=HEAVY))
    out = _run(
        script, "--source", f"imagefolder:{folder}", "--output", str(tmp_path / "out.lance"), "--no-progress"
    )
    assert out == {"code": 0, "worker": [], "torch": False}


def test_lance_cookbook_exports_lazily():
    probe = (
        "import sys, json, lance_cookbook as lc, lance_cookbook.cli, data_prep.disk_usage, "
        "lance_cookbook.object_store\n"
        "before = 'torch' in sys.modules\n"
        "names = [n for n in lc.__all__ if getattr(lc, n, None) is None]\n"
        "print(json.dumps({'before': before, 'missing': names, 'dir': set(lc.__all__) <= set(dir(lc))}))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"before": False, "missing": [], "dir": True}
