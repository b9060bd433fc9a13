"""train.py as a user launches it: its argv for the shrunk quickstart, started as a process with a session of its
own (forked from a server that has imported torch once: tests/support/zygote.py), and killed (or signalled) as soon
as it writes a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from experiment.runner import SIGTERM_EXIT
from tests.support import zygote
from tests.support.paths import REPO
from tests.support.quickstart import tiny_overrides


def train_cli_args(shapes_root: str, run_root: str, *extra: str) -> list[str]:
    """`python train.py ...` argv for the shrunk quickstart (one thread, CPU), as a user launches it."""
    return [sys.executable, os.path.join(REPO, "train.py"), *tiny_overrides(shapes_root, run_root), *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def start_training(argv: list[str], cwd: str) -> zygote.ForkedProcess:
    """`python train.py ...` (or `python -m tool ...`) in a session of its own (so it and its DataLoader workers
    can be killed together), stdout and stderr merged."""
    return zygote.start(argv, cwd, _env())


def run_training(argv: list[str], cwd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py ...` (or `python -m tool ...`) to its end, as `subprocess.run(capture_output=True)`."""
    return zygote.run(argv, cwd, _env(), timeout)


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


def run_commands(commands: list[list[str]], cwd: str = REPO) -> list[subprocess.CompletedProcess]:
    """Each command (what follows `python`: `[script, *args]` or `["-m", module, *args]`) run to its end as a
    process of its own, forked from the process server (tests/support/zygote.py), one after the other: for checks
    of command lines' messages and exit codes, where importing torch once per command would cost most of the time."""
    return [run_training([sys.executable, *command], cwd) for command in commands]


def run_script(script: str, argvs: list[list[str]], cwd: str = REPO) -> list[subprocess.CompletedProcess]:
    """`python script *argv` for each argv (`run_commands`)."""
    return run_commands([[script, *argv] for argv in argvs], cwd)


# 51 training samples at a global batch of 8: 7 steps an epoch, the last one padded (steps 6 and 13), 16 steps
SIXTEEN_STEPS = (
    "trainer.max_steps=16",
    "trainer.max_epochs=3",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "optim.lr=0.01",
    "optim.warmup_ratio=0",
)


def start_sixteen_steps(tmp_path, shapes_root: str, name: str, *extra: str) -> zygote.ForkedProcess:
    """train.py as a user launches it, for 16 steps of the shrunk quickstart, as run `name` under tmp_path/runs."""
    args = train_cli_args(shapes_root, str(tmp_path / "runs"), *SIXTEEN_STEPS, f"logging.run_name={name}", *extra)
    return start_training(args, str(tmp_path))


def finished_losses(tmp_path, proc: zygote.ForkedProcess, name: str) -> dict[int, float]:
    """The run's TensorBoard train/loss {step: value}, once its process has ended (with status 0)."""
    from tests.support.events import scalars

    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    proc.output = out
    return scalars(str(tmp_path / "runs" / "quickstart" / name), "train/loss")


def interrupted_twice(shapes_root: str, tmp_path, overrides, steps_per_epoch: int) -> tuple[str, str, str]:
    """An uninterrupted reference run (`ref/quickstart/f`) beside run `cut`, which is SIGKILLed right after its
    step-3 checkpoint, resumed, SIGTERMed at the end of epoch 0 or later, and resumed to the end; DataLoader workers
    (2) in the interrupted processes. Every process is train.py as a user launches it, with `overrides`. Returns
    (the reference's run dir, cut's run dir, the last process's output)."""
    root, cwd = str(tmp_path / "runs"), str(tmp_path)
    run_dir = os.path.join(root, "quickstart", "cut")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    reference = start_training(
        train_cli_args(shapes_root, str(tmp_path / "ref"), *overrides, "logging.run_name=f"), cwd
    )

    def start(*extra: str) -> zygote.ForkedProcess:
        return start_training(train_cli_args(shapes_root, root, *overrides, "logging.run_name=cut", *extra), cwd)

    proc = start("data.num_workers=2", "checkpoint.every_n_train_steps=3")
    assert kill_after_checkpoint(proc, last) == 3, proc.output[-3000:]
    # the next checkpoint: epoch 0's end (a save at every epoch's end) or later
    proc = start("resume=auto", "data.num_workers=2", f"checkpoint.every_n_train_steps={steps_per_epoch + 2}")
    assert kill_after_checkpoint(proc, last, sig=signal.SIGTERM) >= steps_per_epoch, proc.output[-3000:]
    assert proc.returncode == SIGTERM_EXIT, proc.output[-3000:]
    done = start("resume=auto")
    for p in (reference, done):
        p.output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, p.output[-3000:]
    return os.path.join(str(tmp_path), "ref", "quickstart", "f"), run_dir, done.output
