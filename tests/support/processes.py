"""train.py as a user launches it: its argv for the shrunk quickstart, started in a process group of its own,
and killed (or signalled) as soon as it writes a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from tests.support.paths import REPO
from tests.support.quickstart import tiny_overrides


def train_cli_args(shapes_root: str, run_root: str, *extra: str) -> list[str]:
    """`python train.py ...` argv for the shrunk quickstart (one thread, CPU), as a user launches it."""
    return [sys.executable, os.path.join(REPO, "train.py"), *tiny_overrides(shapes_root, run_root), *extra]


def start_training(argv: list[str], cwd: str) -> subprocess.Popen:
    """train.py in a process group of its own (so it and its DataLoader workers can be killed together)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def kill_after_checkpoint(proc, checkpoint: str, timeout: float = 300, sig: int | None = None) -> int:
    """Signal `proc`'s process group (SIGKILL unless `sig`) as soon as a new `checkpoint` lands, wait for it
    to end; returns the global step of `checkpoint` then."""

    def stamp():
        return (os.stat(checkpoint).st_ino, os.stat(checkpoint).st_mtime_ns) if os.path.exists(checkpoint) else None

    before, deadline = stamp(), time.monotonic() + timeout
    while stamp() in (None, before):  # a new file (saves replace it atomically: a new inode)
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before {checkpoint}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {checkpoint} after {timeout} s")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL if sig is None else sig)
    proc.output = proc.communicate(timeout=timeout)[0]  # for the caller's failure messages
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
