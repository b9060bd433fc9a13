"""SIGTERM at any moment of a job: during a long validation or a long benchmark scoring, train.py stops at the
next batch boundary, saves last.ckpt and exits 143, and resume=auto goes on from there."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from tests.support.processes import run_training, start_training, train_cli_args

EVERY = 3  # steps between checkpoints, validations and benchmark scores


def _eval_set(shapes_root: str, path: str, n: int) -> str:
    val = json.load(open(os.path.join(shapes_root, "sft_val.json")))
    with open(path, "w") as f:
        for k in range(n):
            r = val[k % len(val)]
            question = r["conversations"][0]["value"].replace("<image>", "").strip()
            f.write(json.dumps({"id": k, "image": r["image"], "question": question, "reference": "red"}) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("during", ["validation", "benchmark scoring"])
def test_sigterm_during_long_evaluation_saves_and_exits_at_the_next_batch(shapes_root, tmp_path, during):
    root = str(tmp_path / "runs")
    common = [
        f"checkpoint.every_n_train_steps={EVERY}",
        "trainer.max_steps=12",
        "trainer.max_epochs=9",
        "eval.max_new_tokens=8",
        "logging.run_name=r",
        "data.num_workers=2",  # SIGTERM goes to the whole process group, DataLoader workers included
    ]
    if during == "validation":  # a built-in dataset with 400 held-out records: 400 one-record batches
        common += [f"data.builtin.root={tmp_path}/shapes", "data.builtin.num_val=400", "data.val_batch_size=1"]
        common += [f"trainer.val_check_interval={EVERY}"]
    else:
        eval_file = _eval_set(shapes_root, str(tmp_path / "long.jsonl"), 400)
        common += ["trainer.limit_val_batches=0", f"eval.every_n_steps={EVERY}"]
        common += [f"eval.sets=[{{name: long, file: {eval_file}, image_folder: {shapes_root}, batch_size: 1}}]"]
    proc = start_training(train_cli_args(shapes_root, root, *common), str(tmp_path))
    last = os.path.join(root, "quickstart", "r", "checkpoints", "last.ckpt")
    deadline = time.monotonic() + 300
    while not os.path.exists(last):  # saved at step 3's end; the evaluation starts right after
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    time.sleep(1.0)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    took = time.monotonic() - signalled
    print(f"SIGTERM during {during}: exit {proc.returncode} {took:.2f} s after the signal")
    assert proc.returncode == 143, out[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    run_dir = os.path.dirname(os.path.dirname(last))
    if during == "validation":  # stopped inside it: no validation of step 3 was logged
        assert step == EVERY and "val/loss" not in _tags(run_dir)
    else:  # scoring stopped, nothing logged; the next step saved and stopped
        assert step == EVERY + 1 and not os.path.exists(os.path.join(run_dir, "eval", f"long-step{EVERY}.json"))
    resumed = run_training(train_cli_args(shapes_root, root, *common, "resume=auto"), str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 12  # trained on to the end


def _tags(run_dir: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir)
    ea.Reload()
    return ea.Tags()["scalars"]
