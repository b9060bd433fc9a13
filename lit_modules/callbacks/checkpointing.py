"""Checkpoints a run can always resume from: `last.ckpt` on a schedule, at epoch ends and on SIGTERM
(what SLURM sends before pre-emption); `best-step=N.ckpt` by the monitored metric. The files themselves
are written atomically (lit_modules/checkpoint_io.py)."""

from __future__ import annotations

import glob
import os
import signal
import threading

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_modules.checkpoint_io import remove_stale_temporaries


class LastCheckpoint(L.Callback):
    """`dirpath/last.ckpt`, overwritten: every `every_n_train_steps` steps (None: epoch ends only), after
    each training epoch, and on SIGTERM: its handler notes the signal, at the next training step's end all
    ranks agree on it in one all-reduce and save, and the next step raises `SIGTERMException` before it
    runs; during validation the ranks agree at every validation batch and stop there (benchmark scoring, on
    rank 0 alone, stops between its batches: lit_modules/callbacks/benchmarks.py). `experiment.runner.run`
    then exits with status 143, so a scheduler sees the job did not finish.

    A checkpoint written during training after an epoch's last batch (at the epoch's end, or on SIGTERM
    there) records its loops as "epoch e+1 about to start" (`at_next_epoch_start`): Lightning 2.6 resumes
    the in-between states it saves there one epoch too far (from `on_train_batch_end` of the last batch,
    or from `on_train_epoch_end` when `max_steps` is set), skipping a whole epoch of data.
    On fit start it removes temporary files left by saves that were killed (`AtomicCheckpointIO`).

    Args:
        dirpath: the run's checkpoint directory.
        every_n_train_steps: save period in optimizer steps (None: only at epoch ends and on SIGTERM).
    """

    NAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None
        self._sigterm = self._stopping = False

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.NAME)

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state: optimizer, loops, data position
            self._saved_step = trainer.global_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every rank saves (FSDP / DeepSpeed shards) into rank 0's run directory: ranks that a launcher started
        # together with rank 0 may have named the run differently (experiment/run_dir.py).
        self.dirpath = trainer.strategy.broadcast(self.dirpath)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and os.path.isdir(self.dirpath):
            remove_stale_temporaries(self.dirpath)
        self._saved_step = trainer.global_step  # a resumed run does not rewrite the checkpoint it started from

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6's SIGTERM handler calls dist.broadcast inside the handler: a collective at whatever point
        # each rank's program is, which under DDP can meet another collective (a 2-process job SIGTERMed during
        # training exited 1 instead of saving, now and then). Here the handler only sets a flag, and the ranks
        # agree on it at the next step boundary, all in the same all-reduce.
        self._sigterm = self._stopping = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm)  # Lightning restores its caller's handler at teardown

    def _note_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._stopping:  # here, not right after the save: Lightning logs a step's metrics after its hooks
            raise SIGTERMException  # experiment.runner.run exits with status 143

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.strategy.reduce_boolean_decision(self._sigterm, all=False):  # SIGTERM on any rank
            self._save(trainer)
            self._stopping = True
            return
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, *_) -> None:
        # A long validation (generation on thousands of records) must not outlast the scheduler's grace period
        # (SLURM's KillWait, 30 s by default): stop at the next validation batch. The checkpoint holds the
        # last completed training step and its data position; the resume runs that validation again.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.strategy.reduce_boolean_decision(self._sigterm, all=False):
            self._save(trainer)
            self._stopping = True
            raise SIGTERMException

    @property
    def sigterm_noted(self) -> bool:
        """SIGTERM arrived on this rank (for work outside the loops, e.g. benchmark scoring, to stop early)."""
        return self._sigterm

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Resumed with another global batch (world size x data.batch_size): the DataModule continues at the
        # checkpoint's global sample, and the epoch's batch count is in the new batches, so the fit loop's
        # progress is restated in them (restore_loops reads it after the callbacks' hooks); otherwise the epoch
        # would end early or late.
        dm = trainer.datamodule
        state = checkpoint.get(type(dm).__qualname__) if dm is not None else None
        done = dm.batches_done(state) if state is not None and hasattr(dm, "batches_done") else None
        if done is None or "loops" not in checkpoint:
            return
        batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        shift = done - batches["current"]["ready"]
        for counters in (batches["current"], batches["total"]):
            for key in counters:
                counters[key] += shift

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        batches = trainer.fit_loop.epoch_loop.batch_progress
        if not trainer.training:
            return
        if batches.is_last_batch and batches.current.processed >= trainer.num_training_batches:
            at_next_epoch_start(checkpoint)
        else:  # an epoch that `max_steps` (or SIGTERM) cut short: a longer run goes on inside it
            still_in_epoch(checkpoint)


def at_next_epoch_start(checkpoint: dict) -> None:
    """Rewrite a checkpoint taken after an epoch's last training batch (epoch e) into the state Lightning
    has between two epochs: e+1 epochs done, no batch of the next one started. The DataModule's own
    position (epoch e, all its samples) then starts epoch e+1 at its first sample."""
    loop = checkpoint["loops"]["fit_loop"]
    for progress in loop["epoch_progress"].values():  # "total", "current": ready = started = e+1 here
        done = progress["ready"]
        progress.update(started=done, processed=done, completed=done)
    batches = loop["epoch_loop.batch_progress"]
    batches["total"]["completed"] = batches["total"]["processed"]
    batches["current"] = {k: 0 for k in batches["current"]}
    batches["is_last_batch"] = False
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] = checkpoint["global_step"]


def still_in_epoch(checkpoint: dict) -> None:
    """A checkpoint saved at the end of an epoch that `max_steps` stopped early records the epoch as
    processed, and Lightning 2.6 resumes it at the next epoch, skipping the rest of this one's data (when
    the run is continued with a larger `max_steps`). Mark it unprocessed: the resume takes the next batch."""
    for progress in checkpoint["loops"]["fit_loop"]["epoch_progress"].values():
        progress["processed"] = progress["completed"]


class BestCheckpoints(ModelCheckpoint):
    """`ModelCheckpoint` for `best-step=N.ckpt` files that, when a fit resumes at step S, first deletes the
    best files of steps after S: a killed run wrote them after the checkpoint it resumes from, the restored
    top-k state does not track them, and they would pile up beyond `save_top_k`."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not trainer.is_global_zero or not trainer.global_step or not self.dirpath:
            return
        for path in glob.glob(os.path.join(self.dirpath, "best-step=*.ckpt")):
            step = os.path.basename(path)[len("best-step=") : -len(".ckpt")].split("-")[0]
            if step.isdigit() and int(step) > trainer.global_step:
                os.remove(path)
