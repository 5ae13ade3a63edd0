"""The `sla2` entry point itself: --version, and -h wherever --help works."""

from __future__ import annotations

import subprocess

import pytest
from fixtures_hub import run_cli

import sla2cli
from sla2cli.cli import _register_commands, app

COMMANDS = ("demo", "convert", "calibrate", "finetune", "bench", "report", "sparsity-report")


def test_version_prints_the_package_version(capsys):
    code, stdout, err = run_cli(["--version"], capsys)
    assert code == 0, err
    assert stdout.strip() == f"sla2 {sla2cli.__version__}"


def test_version_of_the_installed_command():
    done = subprocess.run(["sla2", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"sla2 {sla2cli.__version__}"


def test_every_command_is_registered():
    _register_commands()
    assert {command.name for command in app.registered_commands} == set(COMMANDS)


@pytest.mark.parametrize("command", [(), *((name,) for name in COMMANDS)])
def test_dash_h_is_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, long_help, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    code, short_help, err = run_cli([*command, "-h"], capsys)
    assert code == 0, err
    assert short_help == long_help
    assert f"Usage: sla2 {' '.join(command)}".rstrip() in short_help
