"""The package's structure rules (docs/architecture.md), read from the source: they hold for every module.

- no import cycles among the project's modules;
- the project's modules are imported at module top, except where laziness is the point (listed here);
- commands stay thin: no module of sla2cli/cli/ over CLI_MODULE_MAX_LINES lines;
- kernels know nothing of models: sla2_kernels never imports sla2cli;
- the reference oracle depends on nothing from the fast paths it judges;
- tests import the library, never a command module: they run the CLI through its entry point, the
  `sla2cli.cli` package (`main`, and `app` for the registered commands), as a user's shell would.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sla2cli": ROOT / "sla2cli", "sla2_kernels": ROOT / "kernels"}
CLI_MODULE_MAX_LINES = 150
# Function-level imports of the project's own modules that are lazy on purpose (module -> why).
LAZY_IMPORTS = {
    "sla2cli": "the API pulls in torch and diffusers, which `import sla2cli` for the version should not",
}
# The implementations the oracle judges (and the backend switch between them); sla2_kernels counts too.
FAST_PATHS = {
    "sla2cli.ops.attention",
    "sla2cli.ops.backend",
    "sla2cli.ops.blockwise",
    "sla2cli.ops.complement",
    "sla2cli.ops.pooling",
    "sla2cli.ops.soft",
    "sla2cli.ops.triton_op",
}
ORACLE = "sla2cli.ops.reference"
CLI_PACKAGE = "sla2cli.cli"
# What tests may take from the CLI package: the entry point and the app it registers the commands on.
CLI_ENTRY_NAMES = {"main", "app", "_register_commands"}


def _module_name(package: str, path: Path) -> str:
    parts = [package, *path.relative_to(PACKAGES[package]).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {
        _module_name(package, path): path
        for package, folder in PACKAGES.items()
        for path in sorted(folder.rglob("*.py"))
    }


def _resolve(name: str) -> str | None:
    """The project module an imported name belongs to (`sla2cli.ops.route` -> `sla2cli.ops`)."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits at module top) for each import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        # `from pkg import submodule` names the submodule; `from pkg import name` only the package.
        targets = {_resolve(name) for name in names if name.split(".")[0] in PACKAGES}
        targets = {t for t in targets if t is not None and t != module}
        found += [(target, id(node) in top) for target in sorted(targets)]
    return found


@cache
def _graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in _imports(path, module)} for module, path in _modules().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_project_has_modules_to_check():
    assert {"sla2cli.api", "sla2cli.ops.reference", "sla2cli.cli", "sla2_kernels.forward"} <= set(_modules())


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_project_modules_are_imported_at_module_top():
    lazy = [
        f"{module} imports {target} inside a function"
        for module, path in _modules().items()
        for target, at_top in _imports(path, module)
        if not at_top and module not in LAZY_IMPORTS
    ]
    assert lazy == []


@pytest.mark.parametrize("path", sorted((ROOT / "sla2cli" / "cli").glob("*.py")), ids=lambda p: p.name)
def test_commands_stay_thin(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= CLI_MODULE_MAX_LINES, f"{path.name} has {lines} lines; move library logic out of the command"


def test_kernels_know_nothing_of_the_package():
    assert not any(
        target.startswith("sla2cli") for module, targets in _graph().items() if module.startswith("sla2_kernels")
        for target in targets
    )


def test_the_oracle_depends_on_no_fast_path():
    # Only the modules an import names count: importing `sla2cli.ops.geometry` also runs the package's
    # __init__, but the oracle's code does not depend on what that __init__ re-exports.
    graph, reached, todo = _graph(), set(), [ORACLE]
    while todo:
        for target in graph[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert reached, "the oracle imports its block geometry and checks; the graph should show them"
    assert sorted(reached & FAST_PATHS) == []
    assert sorted(module for module in reached if module.startswith("sla2_kernels")) == []


def _cli_imports(path: Path) -> list[str]:
    """Every import in `path` of the CLI package or anything in it, as `module` or `module.name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in found if name == CLI_PACKAGE or name.startswith(f"{CLI_PACKAGE}.")]


def _command_module_imports(path: Path) -> list[str]:
    """The CLI imports in `path` that reach past the entry point into a command module."""
    allowed = {CLI_PACKAGE, *(f"{CLI_PACKAGE}.{name}" for name in CLI_ENTRY_NAMES)}
    return [name for name in _cli_imports(path) if name not in allowed]


def test_tests_use_the_library_not_command_modules():
    paths = sorted((ROOT / "tests").glob("*.py"))
    offenders = [f"{path.name} imports {name}" for path in paths for name in _command_module_imports(path)]
    assert offenders == []
    assert any(_cli_imports(path) for path in paths), "tests run the CLI through sla2cli.cli.main: none seen"


def test_command_module_check_catches_a_command_module(tmp_path):
    path = tmp_path / "test_example.py"
    path.write_text("from sla2cli.cli import main\nfrom sla2cli.cli.bench import register\nimport sla2cli.cli.demo\n")
    assert _command_module_imports(path) == ["sla2cli.cli.bench.register", "sla2cli.cli.demo"]
