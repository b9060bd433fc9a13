"""Shared fixtures: a tiny built-in dataset and its tokenizer, real tokenizers (LLaMA/Vicuna, Llama-3, Qwen2;
tests/fixtures/build_tokenizers.py), and the quickstart config shrunk to seconds; the README's quickstart started
beside the suite. What tests share that is not a fixture lives in tests/support/, one module per topic."""

from __future__ import annotations

import fcntl
import functools
import gc
import os
import shutil
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from tests
# One thread, here and in the processes the tests start (train.py, tools; test_quickstart excepted): the test
# models are tiny, so splitting an op over threads costs more than it saves, and on a shared CPU a second thread
# waits for a busy core (a 4-step tiny fit took 1.4 s with one thread, 11.7 s with two on a loaded machine).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# Python's cyclic collector at its default thresholds (700, 10, 10) ran about 8,000 collections over the fast suite,
# 5.6 s of its 58 s, walking the millions of objects torch, transformers and Lightning keep; collecting every 50,000
# allocations instead took 1.8 s (measured with gc.callbacks, 2 cores): the same garbage, in fewer passes.
gc.set_threshold(50_000, 20, 20)


def pytest_collection_modifyitems(config, items) -> None:
    # The quickstart's test runs last: its train.py started at collection (below) and trained beside the others.
    # Under pytest-xdist it runs first instead, so one worker trains it while the other takes the rest.
    xdist = hasattr(config, "workerinput")
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_quickstart.py::") != xdist)


def pytest_collection_finish(session) -> None:
    # The README's quickstart takes minutes: when its test is selected, it starts now and runs beside the others
    # (under pytest-xdist each worker collects every test, so there the test starts it on the worker it runs on).
    xdist_worker = hasattr(session.config, "workerinput")
    if not xdist_worker and any(item.nodeid.startswith("tests/test_quickstart.py::") for item in session.items):
        from tests.support.readme_quickstart import start_quickstart

        session.config.quickstart = start_quickstart(threads=1)  # one core for it, one for the other tests


def pytest_unconfigure(config) -> None:
    run = getattr(config, "quickstart", None)
    if run is not None:
        if run.proc.poll() is None:  # the session ended early (-x, Ctrl-C): do not leave it running
            run.proc.kill()
            run.proc.wait()
        shutil.rmtree(run.root, ignore_errors=True)


@pytest.fixture
def all_threads():
    """The machine's threads for one test whose model is not tiny (SAM ViT-B at 1024 px), one again after it."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
    from datamodules import generate_shapes

    return generate_shapes(
        str(tmp_path_factory.mktemp("data") / "shapes"), seed=0, image_size=32, num_train=48, num_val=8
    )


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    from datamodules import load_tokenizer

    return load_tokenizer(os.path.join(shapes_root, "tokenizer"))


@pytest.fixture
def tiny_cfg(shapes_root, tmp_path):
    from experiment.config import load_config
    from tests.support.quickstart import tiny_overrides

    def make(*extra: str, path: str | None = None):
        return load_config(path, tiny_overrides(shapes_root, str(tmp_path / "runs")) + list(extra))

    return make


TOKENIZERS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "generated", "tokenizers"
)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """Built once per checkout by the script CI also runs (about 30 s, a few seconds of it fetching);
    when the sources cannot be fetched the tests fail with the script's error, they never skip."""
    script = os.path.join(os.path.dirname(__file__), "fixtures", "build_tokenizers.py")
    os.makedirs(os.path.dirname(TOKENIZERS), exist_ok=True)
    with open(TOKENIZERS + ".lock", "w") as lock:  # pytest-xdist workers: one builds, the others then find it built
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = subprocess.run([sys.executable, script, TOKENIZERS], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"building the tokenizer fixtures failed:\n{run.stderr[-3000:]}", pytrace=False)
    return TOKENIZERS


@pytest.fixture(scope="session")
def real_tokenizer(tokenizer_dir):
    """name ("vicuna", "llama3", "qwen2", "spm-only") -> that real tokenizer as `load_tokenizer` gives it, loaded
    once per session (Qwen2's takes about 1 s) and shared by the tests: one that changes it uses monkeypatch."""
    from datamodules import load_tokenizer

    return functools.cache(lambda name: load_tokenizer(os.path.join(tokenizer_dir, name)))
