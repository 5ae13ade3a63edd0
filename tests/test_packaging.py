"""What pip installs: every package of sla2cli, and one triton version for the runtime and the test extra."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
requirements = pytest.importorskip("packaging.requirements")
version = pytest.importorskip("packaging.version")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _triton(specs: list[str]):
    found = [requirements.Requirement(spec) for spec in specs if spec.startswith("triton")]
    assert len(found) <= 1
    return found[0] if found else None


def test_runtime_and_test_extra_install_the_same_triton():
    """pip takes the newest version every requirement allows: from the test extra's lowest version up,
    runtime and test extra must allow exactly the same versions, or the README's two commands install
    two tritons (the test command replacing the runtime one)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    runtime = _triton(project["dependencies"])
    test = _triton(project["optional-dependencies"]["test"]) or runtime
    assert runtime is not None
    assert str(test.marker) == str(runtime.marker)
    grid = [version.Version(f"{major}.{minor}.{patch}") for major in (3, 4) for minor in range(13) for patch in (0, 1)]
    lowest_tested = min(v for v in grid if test.specifier.contains(v))
    for candidate in grid:
        if candidate >= lowest_tested:
            assert runtime.specifier.contains(candidate) == test.specifier.contains(candidate), candidate


def test_every_package_of_sla2cli_is_installed():
    """setuptools installs only the packages pyproject lists: a new sub-package left out works in an editable
    install and is missing from a wheel."""
    listed = set(tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sla2cli").rglob("__init__.py")
    }
    assert found and found <= listed, sorted(found - listed)
