"""bench/bench_step_cost.py at a tiny size: the plain transformers loop and the project's way with each of its
`optim` options (fused; 8bit with in_backward) compute the same first loss (same weights, same batch), and the table
names the options; the interleaved timing runs too (no options; fused with in_backward)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.slow  # four processes that import torch, transformers and Lightning: about 25 s on 2 cores
def test_bench_step_cost_ways_agree_at_a_tiny_size():
    cmd = [
        sys.executable, "bench/bench_step_cost.py", "--vocab", "512", "--hidden", "64", "--layers", "1",
        "--batch", "2", "--steps", "1", "--warmup", "1", "--threads", "1",
    ]  # fmt: skip
    ways = ["transformers", "labelled+fused", "labelled+8bit+in_backward"]
    how = dict(cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True, text=True)
    run = subprocess.run([*cmd, "--options", "fused", "8bit,in_backward"], **how, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[2:5]}
    assert list(rows) == ways, run.stdout
    first_losses = [float(row[-1]) for row in rows.values()]  # the loss comes before any optimizer step
    assert first_losses == pytest.approx([first_losses[0]] * 3, rel=1e-5), run.stdout
    assert {row[-2] for row in rows.values()} <= {"forward", "backward", "optimizer.step", "build"}, run.stdout

    run = subprocess.run(
        [*cmd, "--interleave", "--options", "none", "fused,in_backward"], **how, timeout=600
    )  # times only, one process
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()[2:]]
    names = ["transformers", "labelled", "labelled+fused+in_backward"]
    assert [r[0] for r in rows] == names and rows[0][2] == "1.00", run.stdout
