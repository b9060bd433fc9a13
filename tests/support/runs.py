"""In-process runs: what train.py does, with extra callbacks, and a callback recording the loss of each step."""

from __future__ import annotations

import lightning as L

from experiment.runner import run


class LossRecorder(L.Callback):
    """train/loss of every step, as the module computed it."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(cfg, *callbacks: L.Callback) -> L.Trainer:
    """`experiment.runner.run` (what train.py does) with extra callbacks."""
    return run(cfg, *callbacks)


def run_script_here(script: str, *args: str) -> int:
    """`python script args...` (a path under the checkout) run in this process as `__main__`, sys.argv and all:
    the command line's own code without a new interpreter importing torch again; its exit status."""
    import os
    import runpy
    import sys

    from tests.support.paths import REPO

    argv, sys.argv = sys.argv, [script, *args]
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as exit:
        return exit.code or 0
    finally:
        sys.argv = argv
    return 0
