"""``lance_cookbook/recipe/`` is what a reader copies: its modules import each other, the standard library
and third-party packages, never the rest of ``lance_cookbook`` or ``data_prep``. Checked on the import
graph (every ``import``/``from ... import`` in every module, function bodies included), not on strings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

RECIPE = REPO / "lance_cookbook" / "recipe"
MODULES = sorted(RECIPE.glob("*.py"))


def imported_modules(path: Path, text: str | None = None) -> set[str]:
    """Absolute names of the modules ``path`` (or ``text`` as if it were ``path``) imports, relative
    imports resolved against its package."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
                # `from . import x` imports the module x of that package
                names.update(f"{base}.{alias.name}" for alias in node.names if not node.module)
            names.add(base)
    return names


def test_the_recipe_has_modules():
    assert {p.stem for p in MODULES} >= {"dataset", "sampler", "collate", "loader", "start_method", "device"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_a_recipe_module_imports_only_the_recipe_and_outside_packages(path: Path):
    ours = {n for n in imported_modules(path) if n.split(".")[0] in ("lance_cookbook", "data_prep")}
    outside = sorted(n for n in ours if not n.startswith("lance_cookbook.recipe"))
    assert outside == [], f"{path.name} imports {outside}"


def test_the_check_sees_a_relative_import_out_of_the_recipe():
    # the check itself can fail: a module importing the training machinery relatively is caught
    text = "from ..training.checkpoint import save_checkpoint\nfrom .dataset import open_dataset\n"
    found = imported_modules(RECIPE / "probe.py", text)
    assert {"lance_cookbook.training.checkpoint", "lance_cookbook.recipe.dataset"} <= found
