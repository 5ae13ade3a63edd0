"""`sla2cli.bench.environment`: which sla2 version and commit the rows name."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from bench_support import CPU, measure_provider

import sla2cli
from sla2cli.bench.environment import describe, git_commit
from sla2cli.bench.providers import get_provider


def _git(folder, *args) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=folder,
        capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != "GIT_DIR"},
    )
    return done.stdout.strip()


@pytest.fixture()
def other_repository(tmp_path):
    """A git repository that is not sla2, with one commit."""
    repo = tmp_path / "other"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("not sla2")
    _git(repo, "add", "notes.txt")
    _git(repo, "commit", "-q", "-m", "unrelated")
    return repo


def _own_commit() -> str | None:
    """sla2's commit when this package is a git checkout (as in development), found independently."""
    package = Path(sla2cli.__file__).resolve().parent
    done = subprocess.run(["git", "-C", str(package.parent), "ls-files", "--error-unmatch", "sla2cli/__init__.py"],
                          capture_output=True, text=True)
    return _git(package.parent, "rev-parse", "HEAD") if done.returncode == 0 else None


def test_rows_carry_sla2s_version_and_never_the_commit_of_the_current_folder(other_repository, monkeypatch):
    monkeypatch.delenv("SLA2_COMMIT", raising=False)
    monkeypatch.chdir(other_repository)
    foreign, own = _git(other_repository, "rev-parse", "HEAD"), _own_commit()
    environment = describe(CPU)
    assert environment.sla2_version == sla2cli.__version__
    assert environment.git_commit == own != foreign
    monkeypatch.setenv("GIT_DIR", str(other_repository / ".git"))  # git's variables do not mislead it either
    assert git_commit() == own
    row = measure_provider(get_provider("sdpa"))
    assert row.environment["sla2_version"] == sla2cli.__version__


@pytest.mark.parametrize("tracked", [False, True])
def test_an_installed_copy_inside_another_repository_has_no_commit(other_repository, monkeypatch, tracked):
    """A virtual environment inside some project's repository: the project's commit is not sla2's."""
    monkeypatch.delenv("SLA2_COMMIT", raising=False)
    package = other_repository / "venv" / "lib" / "site-packages" / "sla2cli"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.1.0"\n')
    if tracked:
        _git(other_repository, "add", "-f", "venv")
        _git(other_repository, "commit", "-q", "-m", "vendored")
    assert git_commit(package) is None
    top_level = other_repository / "sla2cli"  # even at the top, only a tracked package is a checkout
    top_level.mkdir()
    (top_level / "__init__.py").write_text("")
    assert git_commit(top_level) is None
    _git(other_repository, "add", "sla2cli/__init__.py")
    _git(other_repository, "commit", "-q", "-m", "sla2 itself")
    assert git_commit(top_level) == _git(other_repository, "rev-parse", "HEAD")
    monkeypatch.setenv("SLA2_COMMIT", "abc1234")  # a copied tree names its commit
    assert git_commit(package) == "abc1234"
