"""environment.yml and pyproject.toml must list the same packages with the same pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from conftest import REPO


def normalise(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(3).replace(" ", "")


def pip_section_of_environment_yml() -> list[str]:
    lines = (REPO / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    reqs = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.strip().startswith("#"):
            continue
        if len(line) - len(line.lstrip()) < indent:
            break
        reqs.append(line.strip().removeprefix("- ").strip())
    return reqs


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for name, extra in project.get("optional-dependencies", {}).items():
        if name != "bench":  # the benchmark's peers live in an environment of their own (make bench)
            wanted += extra
    assert dict(map(normalise, pip_section_of_environment_yml())) == dict(map(normalise, wanted))


def test_torch_pins_are_exact():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = dict(map(normalise, project["dependencies"]))
    assert deps["torch"] == "==2.14.1" and deps["torchvision"] == "==0.29.1"
    assert deps["pylance"] == ">=14,<15"
    python = next(line for line in (REPO / "environment.yml").read_text().splitlines() if "python=" in line)
    assert "3.11" in python


def test_ci_calls_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text() and "make run" in (REPO / "README.md").read_text()


def _data_module_at(package_dir: Path):
    """lance_cookbook/data.py loaded from a copy at ``package_dir`` (as a wheel would install it)."""
    import importlib.util
    import shutil

    import lance_cookbook.data

    package_dir.mkdir(parents=True)
    shutil.copy(lance_cookbook.data.__file__, package_dir / "data.py")
    spec = importlib.util.spec_from_file_location("copied_data", package_dir / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_data_dir_in_a_checkout_and_when_installed(tmp_path, monkeypatch):
    import lance_cookbook

    monkeypatch.delenv("LANCE_COOKBOOK_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert lance_cookbook.default_data_dir() == REPO / "data"  # this checkout, whatever the cwd
    installed = _data_module_at(tmp_path / "venv/lib/python3.11/site-packages/lance_cookbook")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert installed.default_data_dir() == work / "data"  # not a folder inside site-packages
    monkeypatch.setenv("LANCE_COOKBOOK_DATA", str(tmp_path / "elsewhere"))
    assert installed.default_data_dir() == tmp_path / "elsewhere"
    assert lance_cookbook.default_data_dir() == tmp_path / "elsewhere"
