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


# Runs each argv of a JSON list as `python script argv...` would, one after the other in this one process (so
# torch, transformers and lightning are imported once): stdout and stderr at the file-descriptor level (what
# loggers and warnings write too), the exit status from SystemExit, and an escaping exception as Python prints it.
_SHARED_PROCESS = r"""
import json, os, runpy, sys, tempfile, traceback
script, results = sys.argv[1], []
for argv in json.loads(sys.argv[2]):
    sys.argv = [script, *argv]
    files = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    sys.stdout.flush(); sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        if exit.code is not None and not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    out, err = [(f.seek(0), f.read())[1] for f in files]
    results.append({"returncode": code, "stdout": out, "stderr": err})
print("\n" + json.dumps(results))
"""


def run_in_one_process(script: str, argvs: list[list[str]], cwd: str = REPO) -> list[subprocess.CompletedProcess]:
    """`python script *argv` for each argv, as separate commands would give them (exit status, stdout, stderr),
    run one after the other in one Python process: for checks of a command line's messages and exit codes,
    where importing torch once per command would cost most of the time."""
    import json

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-c", _SHARED_PROCESS, script, json.dumps(argvs)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    return [
        subprocess.CompletedProcess([script, *a], r["returncode"], r["stdout"], r["stderr"])
        for a, r in zip(argvs, results)
    ]
