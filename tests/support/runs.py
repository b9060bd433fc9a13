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
