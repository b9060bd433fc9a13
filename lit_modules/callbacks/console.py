"""A callback that keeps the console to what a researcher reads: validation metrics as they are computed,
and at the end a summary (best and last metrics, checkpoints, run directory, the TensorBoard command)."""

from __future__ import annotations

import logging
import os
import warnings

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from lit_modules.callbacks.checkpointing import LastCheckpoint

# Lightning's startup lines that say nothing about this run (an advert, accelerators that do not exist here).
NOISE = ("💡 Tip:", "TPU available:", "HPU available:", "Loading `train_dataloader` to estimate")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(NOISE)


def quiet_lightning() -> None:
    """Drop the `NOISE` lines from Lightning's console logger (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    # Lightning 2.6 calls torch's deprecated pytree API itself; nothing a user can change.
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated")


class _WithoutVersion:
    """Leaves out `v_num`, the run's name, which Lightning's bars cut to its last 4 characters ("ults" of
    "defaults"); the closing summary names the run directory."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RichBar(_WithoutVersion, RichProgressBar):
    pass


class TQDMBar(_WithoutVersion, TQDMProgressBar):
    pass


def progress_bar() -> L.Callback:
    """The bar Lightning would pick (Rich where it is installed, else tqdm), without `v_num`."""
    return RichBar() if _RICH_AVAILABLE else TQDMBar()


# A mixture's validation per source (lit_modules/source_metrics.py): `val/loss/<source>`, `val/exact_match/<source>`.
PER_SOURCE = ("val/loss/", "val/exact_match/")


def _fmt(metrics: dict, prefix: str) -> str:
    keys = sorted(k for k in metrics if k.startswith(prefix) and not k.startswith(PER_SOURCE))
    return "  ".join(f"{k} {float(metrics[k]):.4g}" for k in keys)


def _per_source(metrics: dict) -> list[str]:
    """One line per metric reported by source: `  val/loss by source: a 2.31  b 2.05`."""
    lines = []
    for prefix in PER_SOURCE:
        values = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
        if values:
            shown = "  ".join(f"{name} {v:.4g}" for name, v in values.items())
            lines.append(f"  {prefix.rstrip('/')} by source: {shown}")
    return lines


class ConsoleReport(L.Callback):
    """Prints `step N: val/loss ... val/exact_match ...` after each validation (a mixture's sources on a line
    each below it) and the summary at the end (the pooled metrics)."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        for k, v in metrics.items():
            better = max if "loss" not in k else min
            self.best[k] = better(self.best.get(k, v), v)
        rank_zero_info("\n".join([f"step {trainer.global_step}: {_fmt(metrics, 'val/')}", *_per_source(metrics)]))

    def on_fit_end(self, trainer, pl_module) -> None:
        last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/loss"))}
        lines = ["", f"finished at step {trainer.global_step}"]
        if last:
            lines.append(f"  last: {_fmt(last, '')}")
        if self.best:
            lines.append(f"  best: {_fmt(self.best, '')}")
        for cb in trainer.callbacks:
            paths = (cb.best_model_path, cb.last_model_path) if isinstance(cb, ModelCheckpoint) else ()
            paths += (cb.path,) if isinstance(cb, LastCheckpoint) else ()
            for path in paths:
                if path and os.path.exists(path):
                    lines.append(f"  checkpoint: {os.path.relpath(path)}")
        if trainer.logger is not None:
            root = os.path.dirname(os.path.dirname(trainer.logger.log_dir))
            lines.append(f"  run directory: {trainer.logger.log_dir}")
            lines.append(f"  compare runs: tensorboard --logdir {root}")
        rank_zero_info("\n".join(dict.fromkeys(lines)))  # a path listed by both checkpoint callbacks once
