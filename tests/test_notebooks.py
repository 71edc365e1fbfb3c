"""Static checks of the notebook chapters: committed clean, runnable under nbmake and under spawn.

Executing them is nbmake's job (``pytest --nbmake notebooks``); these checks are fast and need no kernel.
Each check returns the problems it finds, so the tests below can also show that it catches them.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CHAPTERS = [
    "01_convert.ipynb",
    "02_dataset.ipynb",
    "03_sampler_and_loader.ipynb",
    "04_collate.ipynb",
    "05_launch.ipynb",
]
PARAMETERS_LINE = 'SMALL = os.environ.get("CI") == "true"'
# a line the kernel would hand to a shell or to IPython instead of running it as Python
MAGIC = re.compile(r"^\s*[!%]", re.MULTILINE)
SHELL_STRING = re.compile(r"\b(os\.system|os\.popen|subprocess\.\w+)\(\s*f?['\"]")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[tuple[int, dict, str]]:
    return [(i, c, "".join(c["source"])) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def kernelspec_problems(nb: dict) -> list[str]:
    """nbmake and nbconvert start the kernel named here; ``python3`` exists wherever ipykernel does."""
    spec = nb.get("metadata", {}).get("kernelspec", {})
    return [] if spec.get("name") == "python3" else [f"kernelspec is {spec!r}, expected name 'python3'"]


def output_problems(nb: dict) -> list[str]:
    """Committed notebooks carry no outputs and no execution counts (clean diffs, no stale results)."""
    problems = []
    for i, cell, _ in code_cells(nb):
        if cell.get("outputs"):
            problems.append(f"cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution count {cell['execution_count']}")
    return problems


def shell_problems(nb: dict) -> list[str]:
    """``!torchrun ...`` fails silently: nbmake ignores a shell escape's exit code, and the command may
    not be on the kernel's PATH. Commands run as ``subprocess.run([sys.executable, ...], check=True)``."""
    problems = []
    for i, _, source in code_cells(nb):
        if MAGIC.search(source):
            problems.append(f"cell {i} has a shell escape or IPython magic")
        if SHELL_STRING.search(source):
            problems.append(f"cell {i} runs a shell command string; pass an argv list")
    return problems


def definition_problems(nb: dict) -> list[str]:
    """No top-level ``def`` or ``class`` in a code cell: under spawn, DataLoader workers and torchrun
    children cannot unpickle what a notebook defines ("Can't get attribute ... on <module '__main__'>"),
    so recipes are imported from ``lance_cookbook``."""
    problems = []
    for i, _, source in code_cells(nb):
        tree = ast.parse(source, filename=f"cell {i}")
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        names = [node.name for node in tree.body if isinstance(node, kinds)]
        if names:
            problems.append(f"cell {i} defines {', '.join(names)}; move it into lance_cookbook")
    return problems


def layout_problems(nb: dict) -> list[str]:
    """A chapter opens with a markdown title and intro, then the parameters cell with the CI switch."""
    cells = nb["cells"]
    if len(cells) < 2:
        return ["fewer than two cells"]
    problems = []
    if cells[0]["cell_type"] != "markdown" or not "".join(cells[0]["source"]).startswith("# "):
        problems.append("cell 0 is not a markdown intro starting with a '# ' title")
    if cells[1]["cell_type"] != "code" or PARAMETERS_LINE not in "".join(cells[1]["source"]):
        problems.append(f"cell 1 is not the parameters cell ({PARAMETERS_LINE})")
    return problems


CHECKS = [kernelspec_problems, output_problems, shell_problems, definition_problems, layout_problems]


def test_every_chapter_is_present():
    missing = sorted(set(CHAPTERS) - {p.name for p in NOTEBOOKS})
    assert not missing, f"missing chapters: {missing}"


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook(path: Path, check):
    problems = check(load(path))
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_uses_the_shared_digits(name: str):
    sources = "\n".join(source for _, _, source in code_cells(load(NOTEBOOK_DIR / name)))
    assert "train_uri, test_uri = ensure_digits()" in sources


def test_collate_chapter_keeps_its_benchmark_section():
    cells = load(NOTEBOOK_DIR / "04_collate.ipynb")["cells"]
    headings = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    assert any(h.startswith("## Benchmark") for h in headings)


# ------------------------------------------------------------------- the checks catch what they should
def notebook(*sources: str, kernel: str = "python3") -> dict:
    cells = [{"cell_type": "markdown", "source": "# Title\n\nintro", "metadata": {}}]
    cells += [
        {"cell_type": "code", "source": s, "outputs": [], "execution_count": None, "metadata": {}}
        for s in ("import os\n\n" + PARAMETERS_LINE, *sources)
    ]
    return {"metadata": {"kernelspec": {"name": kernel}}, "cells": cells}


def test_a_clean_notebook_passes():
    nb = notebook("import subprocess, sys\nsubprocess.run([sys.executable, '-V'], check=True)")
    assert [p for check in CHECKS for p in check(nb)] == []


@pytest.mark.parametrize(
    "nb, check",
    [
        (notebook(kernel="python3.11"), kernelspec_problems),
        (notebook("!torchrun --nproc_per_node 2 train.py"), shell_problems),
        (notebook("%%bash\nls"), shell_problems),
        (notebook("import os\nos.system('torchrun train.py')"), shell_problems),
        (notebook("def collate(rows):\n    return rows"), definition_problems),
        (notebook("class Collate:\n    pass"), definition_problems),
        ({"metadata": {}, "cells": notebook("x = 1")["cells"][1:]}, layout_problems),  # no intro
    ],
)
def test_checks_catch_problems(nb: dict, check):
    assert check(nb)


def test_output_check_catches_outputs():
    nb = notebook("print(1)")
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    nb["cells"][2]["execution_count"] = 1
    assert len(output_problems(nb)) == 2


def test_lambdas_are_allowed():
    # only top-level def/class are refused: a lambda used in the notebook's own process (a timing loop)
    # never needs pickling
    nb = notebook("readers = {'row': lambda: 1, 'batch': lambda: 2}")
    assert definition_problems(nb) == []
