"""Benchmark scores during and after training: `eval.sets`, scored with lit_modules/benchmarks.py."""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from foundation.schema import EvalSetConfig
from lit_modules.benchmarks import evaluate
from lit_modules.predictor import Interrupted, Predictor


class Benchmarks(L.Callback):
    """Scores `sets` every `every_n_steps` training steps (None: never during training) and when training
    ends, on global rank 0 (the others go on; generation needs no collective). Logs `eval/<set>/<key>` for
    every metric key and `hparams/eval/<set>` (the metric's first key) for TensorBoard's HPARAMS tab, and
    writes the answers to `<run dir>/eval/<set>-step<N>.json`.

    Args:
        sets: the evaluation sets (`eval.sets`).
        every_n_steps: the period in optimizer steps, or None.
    """

    def __init__(self, sets: list[EvalSetConfig], every_n_steps: int | None = None) -> None:
        self.sets = sets
        self.every_n_steps = every_n_steps
        self._done_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if n and trainer.global_step % n == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._run(trainer, pl_module):  # pre-empted during the final scores: the job did not finish
            raise SIGTERMException

    def _run(self, trainer, pl_module) -> bool:
        """Score and log the sets; False if SIGTERM stopped the scoring (nothing is logged then)."""
        if not self.sets or not trainer.is_global_zero or self._done_step == trainer.global_step:
            return True
        self._done_step = trainer.global_step
        dm = trainer.datamodule
        # SIGTERM (noted by LastCheckpoint) stops the scoring within one batch; training then stops and saves at
        # the next step boundary, where all ranks agree on it.
        noted = [c for c in trainer.callbacks if hasattr(c, "sigterm_noted")]
        try:
            results = evaluate(
                Predictor(pl_module, dm), self.sets, dm.image_token, lambda: any(c.sigterm_noted for c in noted)
            )
        except Interrupted as stop:
            rank_zero_info(f"step {trainer.global_step}: benchmark scoring stopped by SIGTERM ({stop})")
            return False
        metrics = {}
        for name, scores in results.items():
            keys = [k for k in scores if k != "predictions"]
            metrics.update({f"eval/{name}/{k}": float(scores[k]) for k in keys})
            metrics[f"hparams/eval/{name}"] = float(scores[keys[0]])
            if trainer.log_dir:
                path = os.path.join(trainer.log_dir, "eval", f"{name}-step{trainer.global_step}.json")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(scores, f, ensure_ascii=False, indent=1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith("hparams/"))
        rank_zero_info(f"step {trainer.global_step}: {shown}")
