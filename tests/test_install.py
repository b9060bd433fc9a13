"""pyproject.toml is the one place for pins: training installs without the evaluation harness and the test tools,
every dependency is pinned exactly, every third-party import of the project's code is installed by a runtime
dependency (or by the extra its tool checks for), and setuptools packages every source folder."""

from __future__ import annotations

import ast
import glob
import os
import re
import sys
import tomllib

import pytest

from tests.support.paths import REPO

with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    PROJECT = tomllib.load(f)

RUNTIME = PROJECT["project"]["dependencies"]
EXTRAS = PROJECT["project"]["optional-dependencies"]
SETUPTOOLS = PROJECT["tool"]["setuptools"]


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# Import name -> distribution, where they differ (the others are spelled alike).
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image", "lmms_eval": "lmms-eval"}
# Modules imported only under a check that names the extra (foundation.errors.needs_extra).
EXTRA_OF_MODULE = {
    "tools/lmms_eval.py": "eval",
    "tools/write_shards.py": "stream",
    "datamodules/shards.py": "stream",
    "lit_modules/adamw8bit.py": "lowmem",
}
LOCAL = {*SETUPTOOLS["py-modules"], *(p.split(".")[0] for p in SETUPTOOLS["packages"])}


def _third_party_imports(path: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in sys.stdlib_module_names and n not in LOCAL and n != "__future__"}


SOURCES = sorted(
    os.path.relpath(p, REPO)
    for package in SETUPTOOLS["packages"]
    for p in glob.glob(os.path.join(REPO, *package.split("."), "*.py"))
) + [f"{m}.py" for m in SETUPTOOLS["py-modules"]]


def test_training_does_not_install_the_evaluation_harness_or_the_test_tools():
    runtime = {_name(r) for r in RUNTIME}
    extras_only = {"lmms-eval", "wandb", "openai", "yt-dlp", "pytest", "decord", "litdata", "boto3", "bitsandbytes"}
    assert not runtime & extras_only, runtime
    assert {"lmms-eval", "wandb", "decord"} <= {_name(r) for r in EXTRAS["eval"]}
    assert "pytest" in {_name(r) for r in EXTRAS["dev"]}
    assert "litdata" in {_name(r) for r in EXTRAS["stream"]} and set(EXTRAS["stream"]) <= set(EXTRAS["dev"])
    assert "bitsandbytes" in {_name(r) for r in EXTRAS["lowmem"]} and set(EXTRAS["lowmem"]) <= set(EXTRAS["dev"])
    assert "torch==2.15.0" in RUNTIME and "torchvision==0.29.2" in RUNTIME


@pytest.mark.parametrize("group", ["dependencies", *EXTRAS])
def test_every_dependency_is_pinned_exactly(group):
    requirements = RUNTIME if group == "dependencies" else EXTRAS[group]
    unpinned = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][0-9A-Za-z.+\-]*", r)]
    assert not unpinned, f"{group}: pin with ==: {unpinned}"
    names = [_name(r) for r in requirements]
    assert len(names) == len(set(names)), f"{group}: a package listed twice"


@pytest.mark.parametrize("path", SOURCES)
def test_every_import_is_installed_by_the_project(path):
    installed = {_name(r) for r in RUNTIME}
    if path in EXTRA_OF_MODULE:
        installed |= {_name(r) for r in EXTRAS[EXTRA_OF_MODULE[path]]}
    missing = {m for m in _third_party_imports(os.path.join(REPO, path)) if DISTRIBUTION.get(m, m) not in installed}
    assert not missing, f"{path} imports {sorted(missing)}: not a dependency in pyproject.toml"


def test_setuptools_packages_every_source_folder():
    folders = {
        os.path.relpath(os.path.dirname(p), REPO).replace(os.sep, ".")
        for p in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
        if os.path.dirname(p) != REPO
    }
    outside = {"tests", "bench", "data", "runs", "experiments"}  # run from the checkout, not installed
    folders = {f for f in folders if f.split(".")[0] not in outside and not f.startswith(".")}
    assert folders == set(SETUPTOOLS["packages"])
    top_level = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py"))}
    assert top_level == set(SETUPTOOLS["py-modules"]) == {"train"}


def test_no_requirements_file_restates_the_pins():
    assert not os.path.exists(os.path.join(REPO, "requirements.txt"))
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "requirements.txt" not in readme and "requirements.txt" not in ci
    test_command = next(line for line in readme.splitlines() if "-m pytest" in line and "pip install" in line)
    assert "-e '.[dev,eval]'" in test_command and test_command in ci.splitlines()
