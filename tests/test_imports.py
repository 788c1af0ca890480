"""Imports point one way: the package's import graph, read statically (every ``import`` and
``from ... import``, also inside functions), has no cycle, and every module that runs as
``python -m`` imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import stream_learner

PACKAGE = "stream_learner"
ROOT = pathlib.Path(stream_learner.__file__).resolve().parent


def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name → file, for every module of the package."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _resolve(name: str) -> str | None:
    """The package module ``name`` stands for: itself, or the package holding the attribute."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: pathlib.Path) -> set[str]:
    """The package modules that ``module`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module.
            names = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: imports_of(module, path) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack = [(start, iter(sorted(graph[start])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return path[path.index(child) :] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
                on_path.add(child)
    return None


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    source = (
        "import stream_learner.core.records\n"
        "from stream_learner.core import features\n"
        "from stream_learner.core.labels import LabelBuffer\n"
        "def later():\n"
        "    from ..runtime import config\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert imports_of("stream_learner.io.mod", path) == {
        "stream_learner.core.records",
        "stream_learner.core.features",
        "stream_learner.core.labels",
        "stream_learner.runtime.config",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_layers_below_the_commands_and_the_worker_do_not_import_them():
    # cli/ and runtime/ sit on top (README): the learners, I/O and state never reach up to them.
    top = ("stream_learner.cli", "stream_learner.runtime", "stream_learner.__main__")
    reaching_up = sorted(
        f"{module} → {target}"
        for module, targets in import_graph().items()
        if not module.startswith(top)
        for target in targets
        if target.startswith(top)
    )
    assert not reaching_up


def _runs_as_main(path: pathlib.Path) -> bool:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            return True
    return path.name == "__main__.py"


ENTRY_POINTS = sorted(module for module, path in MODULES.items() if _runs_as_main(path))


def test_the_entry_points_are_found():
    assert {
        "stream_learner.io.sources",
        "stream_learner.io.sinks",
        "stream_learner.cli.main",
    } <= set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_entry_point_imports_alone(module):
    # A fresh interpreter, as ``python -m`` gives a child process: an import cycle that the
    # test process hides (its modules are already imported) shows here. A ``__main__`` module
    # runs when imported: it answers ``--help`` instead.
    if module.endswith(".__main__"):
        command = ["-m", module.removesuffix(".__main__"), "--help"]
    else:
        command = ["-c", f"import {module}"]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
