"""Exact resume at the process level: train.py killed (SIGKILL, SIGTERM) and continued with resume=auto
logs the per-step train/loss of an uninterrupted run; resume=auto picks the right run and file."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from experiment.runner import SIGTERM_EXIT, resolve_resume
from lit_modules.callbacks.checkpointing import BestCheckpoints
from lit_modules.checkpoint_io import TMP_MARK, remove_stale_temporaries
from tests.support.events import scalars
from tests.support.processes import kill_after_checkpoint, start_training, train_cli_args
from tests.support.tiny_models import TINY_VIT, flow

# 51 training samples, batch 8: 7 steps an epoch (steps 6, 13 are last batches; 7, 14 first ones).
COMMON = (
    "trainer.max_steps=16",
    "trainer.max_epochs=3",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "optim.lr=0.01",
    "data.packing=true",
    "data.group_by_length=true",
)


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_killed_and_resumed_runs_log_the_uninterrupted_losses(shapes_root, tmp_path):
    root = str(tmp_path / "runs")
    args = lambda *extra: train_cli_args(shapes_root, root, *COMMON, *extra)  # noqa: E731
    run_dir = os.path.join(root, "quickstart", "cut")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    cwd = str(tmp_path)
    # The uninterrupted run, beside the interrupted one and in a root of its own (resume=auto never picks it).
    reference = start_training(
        train_cli_args(shapes_root, str(tmp_path / "ref"), *COMMON, "logging.run_name=full"), cwd
    )

    # 1. 2 workers, SIGKILL after the step-3 checkpoint (mid-epoch 0).
    proc = start_training(args("logging.run_name=cut", "data.num_workers=2", "checkpoint.every_n_train_steps=3"), cwd)
    assert kill_after_checkpoint(proc, last) == 3
    _finish(reference)
    # 2. 4 workers, not persistent, default checkpoint settings: last.ckpt lands at the end of epoch 0 (after its
    #    last batch).
    proc = start_training(args("resume=auto", "data.num_workers=4", "data.persistent_workers=false"), cwd)
    assert kill_after_checkpoint(proc, last) == 7
    # 3. 2 workers, a checkpoint after step 8 (the first batch of epoch 1), then SIGTERM to every process (workers
    #    too) as SLURM sends it.
    proc = start_training(args("resume=auto", "checkpoint.every_n_train_steps=8", "data.num_workers=2"), cwd)
    assert kill_after_checkpoint(proc, last, sig=signal.SIGTERM) >= 8  # saved again after the batch in flight
    assert proc.returncode == SIGTERM_EXIT  # the scheduler sees the job did not finish
    # 4. no workers to the end, across the epoch-1 / epoch-2 boundary.
    _finish(start_training(args("resume=auto", "data.num_workers=0"), cwd))

    full = scalars(str(tmp_path / "ref" / "quickstart" / "full"), "train/loss")
    resumed = scalars(run_dir, "train/loss")
    assert sorted(full) == list(range(16)) and set(range(3, 16)) <= set(resumed)
    for step in range(3, 16):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, full, resumed)
    # The run keeps the config it started with, and no temporary file is left in its checkpoints.
    assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["data"]["num_workers"] == 2
    assert not [f for f in os.listdir(os.path.dirname(last)) if TMP_MARK in f]


def test_resume_auto_picks_the_newest_last_checkpoint_of_the_same_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg("resume=auto")
    root = cfg.logging.root
    assert resolve_resume(cfg) is None
    # same model: an older last.ckpt and Lightning's newer last-v1.ckpt; another encoder: the newest of all
    same = os.path.join(root, "quickstart", "same")
    os.makedirs(os.path.join(same, "checkpoints"))
    from experiment.config import save_config

    save_config(cfg, same)
    for name, age in (("last.ckpt", 30), ("last-v1.ckpt", 20)):
        path = os.path.join(same, "checkpoints", name)
        torch.save({}, path)  # a checkpoint file (resume=auto skips damaged ones)
        os.utime(path, (time.time() - age, time.time() - age))
    other = os.path.join(root, "quickstart", "other")
    os.makedirs(os.path.join(other, "checkpoints"))
    save_config(tiny_cfg(f"model.encoder.model_kwargs={flow(dict(TINY_VIT, depth=2))}"), other)
    torch.save({}, os.path.join(other, "checkpoints", "last.ckpt"))
    assert resolve_resume(cfg) == os.path.join(same, "checkpoints", "last-v1.ckpt")
    assert tiny_cfg("resume=some.ckpt").resume == "some.ckpt"


def test_stale_temporaries_and_future_best_checkpoints_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    for name in (f".last.ckpt{TMP_MARK}{dead.pid}", f".last.ckpt{TMP_MARK}{os.getpid()}", "best-step=4.ckpt"):
        (ckpt / name).write_bytes(b"x")
    (ckpt / "best-step=12.ckpt").write_bytes(b"x")
    assert remove_stale_temporaries(str(ckpt)) == [str(ckpt / f".last.ckpt{TMP_MARK}{dead.pid}")]

    class Trainer:  # what BestCheckpoints reads: a fit resumed at step 8
        is_global_zero, global_step = True, 8

    BestCheckpoints(dirpath=str(ckpt), monitor="val/loss", filename="best-{step}").on_fit_start(Trainer(), None)
    assert sorted(os.listdir(ckpt)) == [f".last.ckpt{TMP_MARK}{os.getpid()}", "best-step=4.ckpt"]
