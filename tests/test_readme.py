"""Every `train.py` command README.md shows: its config loads and validates, and the quickstart ones train
(shrunk to one step on the tiny data) as written. tools/ commands are tested in test_compare.py and
test_lora.py; the two top commands (quickstart, tests) run in CI itself."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from experiment.config import load_config
from experiment.runner import run
from tests.support.paths import REPO
from tests.support.quickstart import tiny_overrides


def readme_train_commands() -> list[list[str]]:
    """The arguments of each `train.py` command in README.md's code blocks (torchrun / srun lines too)."""
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        if "train.py" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.split(" #")[0])
        if "train.py" in words:
            args = words[words.index("train.py") + 1 :]
            commands.append([a for a in args if not a.startswith("&&")])
    return commands


COMMANDS = readme_train_commands()


def test_readme_has_the_commands_it_promises():
    assert len(COMMANDS) >= 6
    assert any("model.encoder.name=sam_vit_b" in c for c in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_each_command_loads_and_validates(args):
    experiment = next((a for a in args if a.endswith(".yaml")), None)
    cfg = load_config(os.path.join(REPO, experiment) if experiment else None, [a for a in args if "=" in a])
    assert cfg.name


QUICKSTART = [c for c in COMMANDS if not c or c[0] == "experiments/quickstart.yaml"]


@pytest.mark.slow  # SAM ViT-B (89.7M parameters) trains one step at 128 px
@pytest.mark.parametrize("args", QUICKSTART, ids=lambda c: " ".join(c) or "(no arguments)")
def test_quickstart_commands_train(args, shapes_root, tmp_path):
    experiment = os.path.join(REPO, args[0]) if args else None
    # The tiny data and model first, the README's overrides after them (as a user types them), then one step.
    shrink = tiny_overrides(shapes_root, str(tmp_path / "runs")) + ["data.max_length=128"]  # the quickstart's
    one_step = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=1"]
    cfg = load_config(experiment, shrink + [a for a in args if "=" in a] + one_step)
    trainer = run(cfg)
    assert trainer.global_step == 1 or (cfg.resume == "auto" and trainer.global_step >= 1)


@pytest.mark.slow  # two processes, each importing torch, transformers and lightning
def test_bench_train_runs_as_documented(shapes_root, tmp_path):
    shrink = [o for o in tiny_overrides(shapes_root, str(tmp_path / "runs")) if not o.startswith("logging.")]
    cmd = [
        sys.executable,
        "bench/bench_train.py",
        "experiments/quickstart.yaml",
        *shrink,
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert "step s" in header and row.startswith("experiments/quickstart.yaml")
