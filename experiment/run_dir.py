"""Run directories, `<logging.root>/<name>/<run name>`, named for what the run changes.

TensorBoard shows the run name beside every curve, so it says what differs from the experiment file:

    python train.py                                              -> runs/quickstart/defaults
    python train.py model.encoder.name=sam_vit_b optim.lr=3e-4   -> runs/quickstart/encoder=sam_vit_b,lr=3e-4
    python train.py logging.run_name=baseline                    -> runs/quickstart/baseline

A name taken by an earlier run gets `-2`, `-3`, ...; an explicit `logging.run_name` that is taken is
refused, unless the run resumes: with `resume=auto` and no checkpoint in it yet (a SLURM job requeued
before its first checkpoint) the run starts there afresh, the earlier attempt's files moved to
`attempt-<n>/`. Rank 0 claims the directory with one atomic `mkdir`, so two jobs started in the same
second never share one; ranks a launcher starts later take rank 0's choice from the environment
(`LastCheckpoint` also broadcasts its directory, for launchers that start all ranks at once).

One job writes to a run at a time: rank 0 holds an exclusive `flock` on `<run>/.lock` while the job runs
(`lock_run_directory`). A second job on the same run (a double submission, two `resume=auto` of one
`logging.run_name`) is refused in one line naming the run and the holder. The kernel drops the lock with
the process, so a job killed with SIGKILL never blocks the next one. On a network filesystem this needs
working `flock` (NFSv4, Lustre mounted with `flock`, GPFS; not Lustre's `localflock`).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import socket
import time

from omegaconf import DictConfig

from foundation.schema import ConfigError

LOCK = ".lock"  # in the run directory; holds "pid <pid> on <host> since <time>" of the job writing there
DEFAULT_NAME = "defaults"  # a run with no command-line overrides
ENV = "VLM_RUN_NAME"  # rank 0's claimed name, inherited by the ranks Lightning's launcher starts
MAX_LENGTH = 120
# Overrides that do not change what the run computes (or name it already) stay out of its name.
UNNAMED = (
    "resume",
    "init_from",
    "logging.",
    "checkpoint.",
    "data.builtin.root",
    "data.num_workers",
    "data.persistent_workers",
    "trainer.enable_progress_bar",
)
# Leaf keys too generic to name a setting alone: `model.encoder.name=x` reads `encoder=x`.
GENERIC = ("name", "path", "model_type", "checkpoint")


def run_name_from_overrides(overrides: list[str]) -> str:
    """`["model.encoder.name=sam_vit_b", "optim.lr=3e-4"]` -> `"encoder=sam_vit_b,lr=3e-4"` (`defaults` if none)."""
    pairs = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.strip().lstrip("+~")
        if not key.startswith(UNNAMED):
            pairs.append((key, value.strip()))
    short = [_short_key(key) for key, _ in pairs]  # the full key where two overrides share a short one
    parts = [f"{s if short.count(s) == 1 else k}={_short_value(v)}" for s, (k, v) in zip(short, pairs)]
    name = re.sub(r"[^\w.=,+\-]", "_", ",".join(parts)) or DEFAULT_NAME
    if len(name) > MAX_LENGTH:  # still unique: the hash is of the whole name
        name = name[: MAX_LENGTH - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def _short_key(key: str) -> str:
    parts = key.split(".")
    while len(parts) > 1 and parts[-1] in GENERIC:
        parts.pop()
    return parts[-1]


def _short_value(value: str) -> str:
    value = value.strip("'\"")
    if "/" in value and not value.startswith(("{", "[")):  # a path: its last component
        value = os.path.basename(value.rstrip("/")) or value
    value = re.sub(r"\s+", "_", re.sub(r"\s*([:,])\s*", r"\1", value.strip()))
    return value.translate(str.maketrans({"{": "", "}": "", "[": "", "]": "", ":": "-"}))


def claim_run_directory(cfg: DictConfig, resume: str | None, rank: int = 0) -> str:
    """The run's directory name under `<logging.root>/<name>/`; rank 0 creates (claims) the directory.

    A resumed run keeps its directory (the one holding `checkpoints/<resume>`), so its curves continue.
    """
    if resume is not None and os.path.basename(os.path.dirname(os.path.abspath(resume))) == "checkpoints":
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(resume))))
    if rank != 0 and os.environ.get(ENV):
        return os.environ[ENV]
    parent = os.path.join(cfg.logging.root, cfg.name)
    explicit = cfg.logging.run_name
    base = explicit or run_name_from_overrides(list(cfg.overrides))
    if rank != 0:  # started alongside rank 0 (torchrun): its base name; LastCheckpoint broadcasts rank 0's path
        return base
    os.makedirs(parent, exist_ok=True)
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(os.path.join(parent, name))
        except FileExistsError:
            run_dir = os.path.join(parent, name)
            if explicit and cfg.resume == "auto" and not glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt")):
                # a requeued job that died before its first checkpoint (with one, resume=auto resumes it, or
                # refuses below when the checkpoint is of another model)
                set_aside(run_dir)
                os.environ[ENV] = name
                return name
            if explicit:
                raise ConfigError(
                    f"'logging.run_name' = {explicit!r}: {run_dir} already holds a run; choose "
                    f"another name, or continue that run with resume=auto (or resume=<its checkpoint>)"
                ) from None
            continue
        os.environ[ENV] = name
        return name
    raise ConfigError(f"{parent}: no free run directory named {base}[-n]")


def set_aside(run_dir: str) -> str:
    """Move what an attempt that left no checkpoint wrote in `run_dir` (config, event files) into
    `run_dir/attempt-<n>/`, so the fresh start's curves are not drawn over it; returns that folder."""
    entries = [e for e in os.listdir(run_dir) if not e.startswith("attempt-") and e != LOCK]
    n = 1
    while os.path.exists(os.path.join(run_dir, f"attempt-{n}")):
        n += 1
    folder = os.path.join(run_dir, f"attempt-{n}")
    os.mkdir(folder)
    for entry in entries:
        os.rename(os.path.join(run_dir, entry), os.path.join(folder, entry))
    return folder


def release_run_directory(cfg: DictConfig, name: str) -> None:
    """Remove the run directory `name` if it holds nothing but its lock (claimed by a run that failed before
    writing)."""
    run_dir = os.path.join(cfg.logging.root, cfg.name, name)
    if os.path.isdir(run_dir) and os.listdir(run_dir) == [LOCK]:
        os.remove(os.path.join(run_dir, LOCK))
    try:
        os.rmdir(run_dir)
    except OSError:  # not empty (a resumed or set-aside run), or already gone
        pass


class RunLock:
    """The exclusive lock of one run directory, held until `release()` or the process ends.

    Args:
        run_dir: the run directory (it exists).
    """

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 512, 0).decode(errors="replace").strip() or "another process"
            self.release()
            raise ConfigError(
                f"{run_dir} is in use by another job ({holder}); wait for it to end, or start another run "
                f"(another logging.run_name)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def lock_run_directory(cfg: DictConfig, name: str, rank: int = 0) -> RunLock | None:
    """Rank 0 locks the run directory `name` (the other ranks of its job write under rank 0's lock)."""
    return RunLock(os.path.join(cfg.logging.root, cfg.name, name)) if rank == 0 else None
