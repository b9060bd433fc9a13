"""Damaged checkpoint files (a partial copy, a full quota, a file that is not a checkpoint) are named in one
line, and `resume=auto` falls back to the newest intact checkpoint of the run."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from experiment.runner import resolve_resume
from lit_modules.checkpoint_io import AtomicCheckpointIO, CheckpointError, check_intact, read_checkpoint


def _save(path, **tensors) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": {k: v for k, v in tensors.items()}, "global_step": 3}, path)
    return str(path)


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _damaged_files(tmp_path) -> dict[str, str]:
    truncated = _save(tmp_path / "truncated.ckpt", w=torch.arange(4096.0))
    _truncate(truncated)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    text = tmp_path / "text.ckpt"
    text.write_text("version https://git-lfs.github.com/spec/v1\n")  # a Git LFS pointer, not the file
    return {"truncated": truncated, "empty": str(empty), "not a checkpoint": str(text)}


@pytest.mark.parametrize("case", ["truncated", "empty", "not a checkpoint"])
def test_a_damaged_file_is_one_line_that_names_it(tmp_path, case):
    path = _damaged_files(tmp_path)[case]
    for read in (read_checkpoint, check_intact, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert str(err.value).startswith(f"{path}: damaged") and "\n" not in str(err.value)


def test_an_intact_file_reads_as_saved(tmp_path):
    path = _save(tmp_path / "ok.ckpt", w=torch.arange(10.0))
    check_intact(path)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.arange(10.0))
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["state_dict"]["w"], torch.arange(10.0))


def _cfg(root, resume="auto", run_name=None):
    return OmegaConf.create({"resume": resume, "name": "exp", "logging": {"root": str(root), "run_name": run_name}})


def test_resume_auto_skips_a_damaged_last_for_the_newest_intact_checkpoint_of_the_run(tmp_path, capsys):
    ckpts = tmp_path / "exp" / "run" / "checkpoints"
    older = _save(ckpts / "best-step=2.ckpt", w=torch.zeros(8))
    newer = _save(ckpts / "best-step=4.ckpt", w=torch.zeros(8))
    last = _save(ckpts / "last.ckpt", w=torch.zeros(4096))
    os.utime(older, (1, 1))
    os.utime(newer, (2, 2))
    assert resolve_resume(_cfg(tmp_path)) == last
    _truncate(last)
    assert resolve_resume(_cfg(tmp_path)) == newer
    err, size = capsys.readouterr().err.splitlines(), os.path.getsize(last)
    assert err == [
        f"resume=auto: skipped {last}: damaged: truncated or corrupt ({size} bytes; File is not a zip file)",
        f"resume=auto: resuming from {newer}, the newest intact checkpoint of the run",
    ]
    _truncate(newer)
    _truncate(older)
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*checkpoints: .*last.ckpt: damaged"):
        resolve_resume(_cfg(tmp_path))


def test_an_explicit_resume_to_a_damaged_file_is_an_error(tmp_path):
    path = _damaged_files(tmp_path)["truncated"]
    with pytest.raises(CheckpointError, match="truncated.ckpt: damaged"):
        resolve_resume(_cfg(tmp_path, resume=path))


@pytest.mark.slow
def test_train_py_and_predict_with_a_damaged_last_checkpoint(shapes_root, tmp_path):
    """Through the command lines: resume=auto skips a truncated last.ckpt for the run's best checkpoint and says
    so; an explicit resume to it and tools.predict on it are one-line errors (status 2)."""
    import sys

    from tests.support.processes import run_training, train_cli_args

    root = str(tmp_path / "runs")
    common = ["logging.run_name=r", "trainer.max_steps=6", "trainer.max_epochs=2", "trainer.val_check_interval=3"]

    def run(*argv: str):
        return run_training(list(argv), str(tmp_path))

    first = run(*train_cli_args(shapes_root, root, *common))
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = os.path.join(root, "quickstart", "r")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    _truncate(last)
    resumed = run(*train_cli_args(shapes_root, root, *common, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("resume=auto:")]
    assert lines[0].startswith(f"resume=auto: skipped {last}: damaged: truncated or corrupt")
    assert lines[1].startswith(f"resume=auto: resuming from {run_dir}/checkpoints/best-step=")
    _truncate(last)  # the resumed run wrote a new one
    explicit = run(*train_cli_args(shapes_root, root, *common, f"resume={last}"))
    predict = run(sys.executable, "-m", "tools.predict", run_dir, "--question", "What color are the shapes?")
    for failed in (explicit, predict):
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        (line,) = failed.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"error: {last}: damaged: truncated or corrupt"), failed.stderr[-3000:]
