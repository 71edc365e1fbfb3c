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
    "06_object_storage.ipynb",
    "07_which_loader.ipynb",
    "08_data_evolves.ipynb",
]
# chapter 6 converts the digits into its own S3 bucket instead
DIGITS_CHAPTERS = [name for name in CHAPTERS if name != "06_object_storage.ipynb"]
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


# calls that hand their arguments to DataLoader workers, and the arguments that cross: the dataset (first
# positional or dataset=), the collate and the worker initializer
LOADER_CALLS = {"make_loader", "DataLoader", "get_safe_loader", "StreamingDataLoader", "ReentrantDataLoader"}
WORKER_KEYWORDS = {"dataset", "collate_fn", "worker_init_fn"}
GETSOURCE_LIMIT = 4  # chapters write main-process code in cells; getsource is for what cannot be


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _uses(node: ast.AST, names: set[str]) -> list[str]:
    """Names of ``names`` read inside ``node``, and ``lambda`` for a lambda in it."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in names:
            found.append(sub.id)
        elif isinstance(sub, ast.Lambda):
            found.append("lambda")
    return found


def definition_problems(nb: dict) -> list[str]:
    """Nothing a notebook defines reaches a DataLoader worker. Under spawn and forkserver a worker unpickles
    the dataset, the collate and ``worker_init_fn``, and cannot find what a notebook's ``__main__`` defined
    ("Can't get attribute ... on <module '__main__'>", pytorch#46648), so those come from ``lance_cookbook``.

    Main-process code (a sampler, an evaluation loop, ``to_device``, a training step) may be defined in a
    cell. Checked statically: a ``def``/``class`` of the notebook, a lambda, or a variable assigned from one
    of them, passed as the dataset, ``collate_fn=`` or ``worker_init_fn=`` of a loader call, or as the
    function of ``mp.spawn`` / ``Process(target=...)``.
    """
    defined: set[str] = set()  # defined in the notebook, or assigned from something that was
    problems = []
    for i, _, source in code_cells(nb):
        tree = ast.parse(source, filename=f"cell {i}")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                if _uses(node.value, defined) and not isinstance(node.value, ast.Lambda):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name = _called_name(call)
            if name in LOADER_CALLS:
                crossing = call.args[:1] + [k.value for k in call.keywords if k.arg in WORKER_KEYWORDS]
            elif name == "spawn":
                crossing = call.args[:1]
            elif name == "Process":
                crossing = [k.value for k in call.keywords if k.arg == "target"]
            else:
                continue
            for arg in crossing:
                for used in _uses(arg, defined):
                    problems.append(
                        f"cell {i} passes {used} (defined in the notebook) to {name}, whose worker processes "
                        "cannot unpickle it; import it from lance_cookbook"
                    )
    return problems


def getsource_count(nb: dict) -> int:
    return sum(source.count("getsource(") for _, _, source in code_cells(nb))


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


@pytest.mark.parametrize("name", DIGITS_CHAPTERS)
def test_chapter_uses_the_shared_digits(name: str):
    sources = "\n".join(source for _, _, source in code_cells(load(NOTEBOOK_DIR / name)))
    assert "train_uri, test_uri = ensure_digits()" in sources


def test_chapters_show_code_in_cells_not_through_getsource():
    counts = {p.name: getsource_count(load(p)) for p in NOTEBOOKS}
    assert sum(counts.values()) <= GETSOURCE_LIMIT, f"inspect.getsource calls per chapter: {counts}"


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
        (
            notebook("def collate(rows):\n    return rows", "lc.make_loader(uri, collate_fn=collate)"),
            definition_problems,
        ),
        (notebook("class Collate:\n    pass", "DataLoader(ds, collate_fn=Collate())"), definition_problems),
        (
            notebook("class Rows:\n    pass", "rows = Rows()", "DataLoader(rows, num_workers=2)"),
            definition_problems,
        ),
        (notebook("def init(i):\n    pass", "lc.make_loader(uri, worker_init_fn=init)"), definition_problems),
        (notebook("get_safe_loader(ds, collate_fn=lambda rows: rows)"), definition_problems),
        (notebook("def run(rank):\n    pass", "mp.spawn(run, nprocs=2)"), definition_problems),
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


def test_main_process_code_may_be_defined_in_a_cell():
    # a sampler, an evaluation loop or a train step runs in the notebook's own process: never pickled
    nb = notebook(
        "def my_shard_sampler(n, w, r):\n    return range(n * r // w, n * (r + 1) // w)",
        "sampler = my_shard_sampler(10, 2, 0)",
        "loader = lc.make_loader(uri, sampler=sampler, collate_fn=lc.ImageCollate(32))",
        "def evaluate(model, loader):\n    return sum(len(b) for b in loader)",
    )
    assert definition_problems(nb) == []


def test_getsource_count_counts_every_call():
    nb = notebook("print(inspect.getsource(f))", "print(inspect.getsource(g)); inspect.getsource(h)")
    assert getsource_count(nb) == 3


def test_lambdas_are_allowed():
    # a lambda used in the notebook's own process (a timing loop) never needs pickling
    nb = notebook("readers = {'row': lambda: 1, 'batch': lambda: 2}")
    assert definition_problems(nb) == []
