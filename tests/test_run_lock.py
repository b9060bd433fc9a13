"""One writer per run: a second job on a run in use is refused in one line naming the run and its holder; a
holder killed with SIGKILL blocks nobody."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from experiment.run_dir import LOCK, RunLock
from foundation.schema import ConfigError
from tests.support.paths import REPO
from tests.support.processes import run_training, start_training, train_cli_args

HOLD = (
    "import sys, time; from experiment.run_dir import RunLock;"
    " RunLock(sys.argv[1]); print('held', flush=True); time.sleep(600)"
)


def _hold(run_dir: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, run_dir], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_until_the_holder_is_killed(tmp_path):
    holder = _hold(str(tmp_path))
    try:
        with pytest.raises(ConfigError) as err:
            RunLock(str(tmp_path))
        assert f"{tmp_path} is in use by another job (pid {holder.pid} on " in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path))  # the kernel dropped the dead holder's lock
    assert open(tmp_path / LOCK).read().startswith(f"pid {os.getpid()} on ")
    lock.release()
    RunLock(str(tmp_path)).release()  # released: free again


@pytest.mark.slow
def test_train_py_refuses_a_run_that_another_job_is_training(shapes_root, tmp_path):
    root = str(tmp_path / "runs")
    args = train_cli_args(shapes_root, root, "logging.run_name=shared", "resume=auto", "trainer.limit_val_batches=0")
    first = start_training(args + ["trainer.max_steps=100000", "trainer.max_epochs=100000"], str(tmp_path))
    lock = os.path.join(root, "quickstart", "shared", LOCK)
    try:
        deadline = time.monotonic() + 120
        while not (os.path.exists(lock) and open(lock).read()):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.05)
        second = run_training(args, str(tmp_path), timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {os.path.dirname(lock)} is in use by another job (pid {first.pid} on ")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    third = start_training(args + ["trainer.max_steps=100000", "trainer.max_epochs=100000"], str(tmp_path))
    try:  # the next job takes the run over: the lock names it
        deadline = time.monotonic() + 120
        while not open(lock).read().startswith(f"pid {third.pid} on "):
            assert third.poll() is None and time.monotonic() < deadline, third.stdout.read()
            time.sleep(0.05)
    finally:
        os.killpg(third.pid, signal.SIGKILL)
        third.wait()
