"""The README's quickstart (`python train.py`) started in the background when the test that checks it is collected,
so its minutes overlap the rest of the suite instead of adding to them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tests.support.paths import REPO


@dataclass
class QuickstartRun:
    proc: subprocess.Popen
    root: str  # holds shapes/ (the generated data) and runs/
    started: float  # time.perf_counter() at the start

    def finish(self) -> tuple[subprocess.CompletedProcess, float]:
        """Wait for it; its result and the minutes from start to end."""
        out, err = self.proc.communicate()
        done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return done, (time.perf_counter() - self.started) / 60


def start_quickstart(threads: int | None = None) -> QuickstartRun:
    """`python train.py` as the README runs it, with its data and runs in a temporary folder; on `threads` threads
    (None: the machine's, as the README runs it; 1 beside the other tests, which take the other core: two threads
    sharing one busy core spend most of their time waiting for each other)."""
    root = tempfile.mkdtemp(prefix="quickstart-")
    overrides = [f"data.builtin.root={root}/shapes", f"logging.root={root}/runs", "trainer.enable_progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # conftest's one thread: not the README's
    env["HF_HUB_OFFLINE"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return QuickstartRun(proc, root, time.perf_counter())
