"""The layout docs/ARCHITECTURE.md describes, checked on the source: who may import whom, no cycles."""

from __future__ import annotations

import ast
import glob
import os

import pytest

from tests.support.paths import REPO

PACKAGES = ("core", "encoders", "lit_modules", "datamodules", "tools", "train", "tests", "bench")
# Modules the library packages must not reach: the experiment layer sits on top of them.
ON_TOP = ("experiment.config", "experiment.validate", "experiment.runner", "experiment.describe", "tools", "train")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
    """Project modules imported anywhere in the file (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


SOURCES = {
    _module_name(p): _imports(p)
    for p in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
    if not os.path.relpath(p, REPO).startswith((".venv", "data"))
}


def _reaches(imported: str, target: str) -> bool:
    return imported == target or imported.startswith(target + ".")


@pytest.mark.parametrize("module", ["foundation.schema", "foundation.registry"])
def test_schema_and_registry_import_nothing_from_the_project(module):
    assert SOURCES[module] == set()


@pytest.mark.parametrize("package", ["encoders", "lit_modules", "datamodules"])
def test_library_packages_do_not_import_the_layer_above(package):
    for module, imports in SOURCES.items():
        if module.split(".")[0] == package:
            bad = [i for i in imports for top in ON_TOP if _reaches(i, top)]
            assert not bad, f"{module} imports {bad}"


def test_nothing_imports_train_py_and_tests_share_only_support():
    for module, imports in SOURCES.items():
        assert not any(_reaches(i, "train") for i in imports), module
        if module.startswith("tests."):
            others = {i for i in imports if i.startswith("tests.") and not _reaches(i, "tests.support")}
            assert not others, f"{module} imports test modules {others}"


def test_no_import_cycles_between_modules():
    # `from a.b import c` names module a.b.c or attribute c of a.b: whichever of them is a module
    graph = {m: {n for i in imps for n in (i, i.rsplit(".", 1)[0]) if n in SOURCES} for m, imps in SOURCES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m] - {m}:
            if n.startswith(m + "."):  # a package importing its own submodules (its __init__) is no cycle
                continue
            if state.get(n) == 1 and not m.startswith(n + "."):
                raise AssertionError("import cycle: " + " -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
