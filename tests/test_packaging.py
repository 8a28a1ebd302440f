"""The wheel ships what the package reads at run time: the built-in teacher and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "milan"


def test_package_data_covers_every_runtime_file() -> None:
    """Every file in assets/ and configs/ matches a package-data glob (a new asset of another
    extension, e.g. a .bin teacher, would otherwise be left out of the wheel silently)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["milan"]
    shipped = {p for g in globs for p in PACKAGE.glob(g) if p.is_file()}
    needed = {p for d in ("assets", "configs") for p in (PACKAGE / d).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert needed, "no runtime files found: the layout changed"
    assert needed <= shipped, sorted(str(p.relative_to(PACKAGE)) for p in needed - shipped)


def test_distribution_name_and_command() -> None:
    """The distribution is not `milan` (an unrelated project on the index); the command stays `milan`,
    and the extras refer to the project by its own name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "milan-mim"
    assert project["scripts"] == {"milan": "milan.tools.cli:run"}
    for extra in project["optional-dependencies"]["dev"]:
        assert not extra.startswith("milan["), extra
    assert f"pip install {project['name']}" in (ROOT / "README.md").read_text()
