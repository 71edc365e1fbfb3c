"""environment.yml and pyproject.toml must list the same packages with the same pins."""

from __future__ import annotations

import re
import tomllib

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
    for extra in project.get("optional-dependencies", {}).values():
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
