"""The layers docs/ARCHITECTURE.md draws, checked on the source: imports point down, and nothing is circular.

The packages come from the layout (every top-level folder with an `__init__.py`, every top-level script, and
`bench/`), their imports from the source (top level and inside functions), and each package's layer from the
table under "## Layers" in docs/ARCHITECTURE.md, so a new package must be placed in that table to pass.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

from tests.support.paths import REPO

TESTS = "tests"


def _packages() -> set[str]:
    """Top-level packages and scripts of the project, as they lie on disk (tests aside)."""
    found = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "*", "__init__.py"))}
    found |= {os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(REPO, "*.py"))}
    found.add("bench")  # scripts, no package
    return found - {TESTS}


PACKAGES = _packages()


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
    """Project modules imported anywhere in the file; `from a import b` gives both a and a.b."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES | {TESTS})
    return found


SOURCES = {
    _module_name(p): _imports(p)
    for top in sorted(PACKAGES | {TESTS})
    for p in glob.glob(os.path.join(REPO, top, "**", "*.py"), recursive=True)
    + glob.glob(os.path.join(REPO, top + ".py"))
}
# module -> the project modules it imports (`from a.b import c` names module a.b.c or attribute c of a.b)
MODULES = {m: {n for i in imps for n in (i, i.rsplit(".", 1)[0]) if n in SOURCES} - {m} for m, imps in SOURCES.items()}


def _layers() -> dict[str, int]:
    """package -> layer number, read from the table under "## Layers" in docs/ARCHITECTURE.md."""
    doc = open(os.path.join(REPO, "docs", "ARCHITECTURE.md")).read()
    table = doc.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for row in re.findall(r"^\| *(\d+)\. [^|]+\|([^|]+)\|", table, re.M):
        for name in re.findall(r"`([\w.]+?)(?:\.py|/)?`", row[1]):
            layers[name] = int(row[0])
    return layers


LAYERS = _layers()


def _package(module: str) -> str:
    return module.split(".")[0]


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, imports in MODULES.items():
        if _package(module) in PACKAGES:
            graph[_package(module)] |= {_package(i) for i in imports} - {_package(module)}
    return graph


def _find_cycle(graph: dict[str, set[str]], skip=lambda a, b: False) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if skip(node, nxt):
                continue
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_every_package_sits_in_one_layer_of_the_documented_table():
    assert set(LAYERS) == PACKAGES, (
        f"docs/ARCHITECTURE.md's layer table misses {sorted(PACKAGES - set(LAYERS))} "
        f"and names {sorted(set(LAYERS) - PACKAGES)}, which do not exist"
    )
    assert sorted(set(LAYERS.values())) == [1, 2, 3, 4]


def test_the_foundation_imports_nothing_from_the_project():
    (floor,) = [p for p, layer in LAYERS.items() if layer == 1]
    leaks = {m: i for m, i in MODULES.items() if _package(m) == floor and i - {n for n in i if _package(n) == floor}}
    assert not leaks, leaks


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_point_down_the_layers(package):
    upward = [
        f"{module} imports {i} (layer {LAYERS[_package(i)]})"
        for module, imports in MODULES.items()
        if _package(module) == package
        for i in imports
        if _package(i) != TESTS and LAYERS[_package(i)] > LAYERS[package]
    ]
    assert not upward, f"{package} is in layer {LAYERS[package]}: " + "; ".join(upward)


def test_no_import_cycle_between_packages():
    assert _find_cycle(_package_graph()) is None, _find_cycle(_package_graph())


def test_no_import_cycle_between_modules():
    # a package importing its own submodules (its __init__ re-exporting them) is no cycle
    def own_part(a: str, b: str) -> bool:
        return b.startswith(a + ".") or a.startswith(b + ".")

    cycle = _find_cycle(MODULES, own_part)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(MODULES.get(m, ()))
    return seen


@pytest.mark.parametrize("module", ["inference.load", "inference.export", "tools.predict", "tools.export"])
def test_loading_a_trained_run_does_not_import_the_trainer(module):
    # predict, evaluate and export load a run through its checkpoint reader and builder (STYLE 20)
    reached = _closure(module)
    assert not {m for m in reached if m == "experiment.runner" or m.startswith("lit_modules.callbacks")}


def test_nothing_imports_the_command_lines_and_tests_share_only_support():
    commands = [p for p, layer in LAYERS.items() if layer == max(LAYERS.values())]
    for module, imports in MODULES.items():
        if _package(module) not in commands:
            # tests may drive tools' library functions; nothing imports the script train.py
            allowed = {"tools"} if _package(module) == TESTS else set()
            bad = {i for i in imports if _package(i) in set(commands) - allowed}
            assert not bad, f"{module} imports command-line modules {bad}"
        if _package(module) == TESTS:
            others = {i for i in imports if i.startswith("tests.") and not i.startswith("tests.support")}
            assert not others, f"{module} imports test modules {others}"
