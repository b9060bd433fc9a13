"""The runner: an experiment config -> tokenizer, DataModule, VLMModule, Trainer -> fit.

    cfg = load_config("experiments/quickstart.yaml", ["optim.lr=3e-4"])
    trainer = run(cfg)

`train.py` is the command line over `run`. The pieces come from `experiment.assemble`; a trained run
comes back without the Trainer through `inference.load`.
"""

from __future__ import annotations

import glob
import os
import pickle
import sys

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from experiment.assemble import build_datamodule, build_module, build_tokenizer
from experiment.config import save_config
from experiment.preflight import check_files, check_machine
from experiment.run_dir import claim_run_directory, lock_run_directory, release_run_directory
from experiment.strategy import build_strategy
from foundation.schema import ConfigError
from lit_modules.callbacks import (
    Benchmarks,
    BestCheckpoints,
    ConsoleReport,
    LastCheckpoint,
    LearningRates,
    RunSummary,
    StepThroughput,
    ThroughputRates,
    ValidationSamples,
)
from lit_modules.callbacks.console import progress_bar, quiet_lightning
from lit_modules.checkpoint_io import AtomicCheckpointIO, CheckpointError, check_intact, load_weights
from lit_modules.vlm_module import VLMModule

# What decides a checkpoint's keys: `resume=auto` only continues a run whose saved config agrees on these.
RESUME_KEYS = ("stage", "trainable", "model")


def _same_model(cfg: DictConfig, run_dir: str) -> bool:
    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved):  # a run from before config.yaml was saved: nothing to compare
        return True
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    return all(old.get(k) == new.get(k) for k in RESUME_KEYS)


def resolve_resume(cfg: DictConfig) -> str | None:
    """`resume=auto` -> the newest last.ckpt (or Lightning's last-v<n>.ckpt) among this experiment's runs
    with the same stage, trainable parts and model (None if there is none yet): a run of the experiment
    with another encoder or LLM has other keys and is never picked. A damaged file is skipped for the newest
    intact checkpoint of the same run (best-*.ckpt included), and both are named; an explicit `resume=<path>`
    to a damaged file is a `CheckpointError`."""
    if cfg.resume != "auto":
        if cfg.resume:
            check_intact(cfg.resume)
        return cfg.resume
    run = cfg.logging.run_name or "*"  # a named run continues only itself
    found = glob.glob(os.path.join(cfg.logging.root, cfg.name, run, "checkpoints", "last*.ckpt"))
    found = [f for f in found if _same_model(cfg, os.path.dirname(os.path.dirname(f)))]
    if not found:
        return None
    newest = max(found, key=os.path.getmtime)
    ours = sorted(glob.glob(os.path.join(os.path.dirname(newest), "*.ckpt")), key=os.path.getmtime, reverse=True)
    candidates = [newest] + [f for f in ours if f != newest]
    skipped = []
    for path in candidates:
        try:
            check_intact(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        if skipped and rank_zero_only.rank == 0:
            for reason in skipped:
                print(f"resume=auto: skipped {reason}", file=sys.stderr)
            print(f"resume=auto: resuming from {path}, the newest intact checkpoint of the run", file=sys.stderr)
        return path
    raise CheckpointError(f"resume=auto: no intact checkpoint in {os.path.dirname(newest)}: " + "; ".join(skipped))


def build_trainer(
    cfg: DictConfig, resume: str | None = None, module: VLMModule | None = None, run_name: str | None = None
) -> L.Trainer:
    """`module` is needed for FSDP, which wraps the model's transformer blocks (experiment/strategy.py);
    `run_name`: the run directory `run` claimed (None: claim one here, experiment/run_dir.py)."""
    # A resumed run keeps writing to its own run directory, so its curves continue in TensorBoard.
    run_name = run_name or claim_run_directory(cfg, resume, rank_zero_only.rank)
    logger = TensorBoardLogger(cfg.logging.root, name=cfg.name, version=run_name, default_hp_metric=False)
    ck, ckpt_dir = cfg.checkpoint, os.path.join(logger.log_dir, "checkpoints")
    callbacks = [
        # last.ckpt on a step schedule, each epoch end and on SIGTERM for resuming; best-*.ckpt when
        # validation improves.
        LastCheckpoint(ckpt_dir, every_n_train_steps=ck.every_n_train_steps),
        BestCheckpoints(
            dirpath=ckpt_dir, monitor=ck.monitor, mode=ck.mode, save_top_k=ck.save_top_k, filename="best-{step}"
        ),
        LearningRates(),  # lr/<part>: one curve per part, not one per optimizer group
        # image / text tokens/s, data wait, peak memory; sets the module's flops_per_batch, so it comes first
        StepThroughput(every_n_steps=cfg.trainer.get("log_every_n_steps") or 50),
        # samples/s, tokens/s ("items" = non-padding tokens, image tokens included), FLOP/s and MFU
        ThroughputRates(
            batch_size_fn=lambda b: len(b.get("ids", [])),
            length_fn=lambda b: int(b["attention_mask"].sum()) if "attention_mask" in b else 0,
            window_size=10,
        ),
        ValidationSamples(cfg.eval.num_logged_samples),
        RunSummary(),
        ConsoleReport(),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(progress_bar())
    if cfg.eval.sets:  # benchmark scores during and after training (lit_modules/benchmarks.py)
        callbacks.append(Benchmarks(OmegaConf.to_object(cfg.eval).sets, cfg.eval.every_n_steps))
    args = OmegaConf.to_container(cfg.trainer)
    args.setdefault("enable_model_summary", False)  # the module logs its own per-part parameter table
    args["strategy"] = build_strategy(args.get("strategy"), module)
    if "deepspeed" not in str(args["strategy"]).lower():  # DeepSpeed writes checkpoint directories itself
        args.setdefault("plugins", []).append(AtomicCheckpointIO())  # a crash mid-save keeps the old file
    # The DataModule's sampler shards data across ranks itself (deterministic, resumable order).
    return L.Trainer(**args, logger=logger, callbacks=callbacks, use_distributed_sampler=False)


SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a job ended by the signal


def run(cfg: DictConfig, *callbacks: L.Callback) -> L.Trainer:
    """config -> seed -> tokenizer -> datamodule -> module (+ init_from) -> trainer -> fit; returns the trainer."""
    check_files(cfg)  # before minutes of model building and before a run directory exists
    check_machine(cfg)  # kernels this machine cannot run fail here, not at the first step
    resume = resolve_resume(cfg)
    run_name = claim_run_directory(cfg, resume, rank_zero_only.rank)  # before minutes of model building
    lock = None
    try:
        lock = lock_run_directory(cfg, run_name, rank_zero_only.rank)  # one job per run; released at the end
        return _build_and_fit(cfg, resume, run_name, callbacks)
    except BaseException:  # a build that fails leaves no empty run directory behind to take the name
        if lock is not None:  # rank 0, which claimed it
            release_run_directory(cfg, run_name)
        raise
    finally:
        if lock is not None:
            lock.release()


def _build_and_fit(cfg: DictConfig, resume: str | None, run_name: str, callbacks) -> L.Trainer:
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    module = build_module(cfg, tokenizer)
    if cfg.init_from:
        load_weights(module, cfg.init_from)
    trainer = build_trainer(cfg, resume, module, run_name)
    trainer.callbacks.extend(callbacks)
    if trainer.is_global_zero:
        print(f"run directory: {trainer.logger.log_dir}  (tensorboard --logdir {cfg.logging.root})")
        if not (resume and os.path.isfile(os.path.join(trainer.logger.log_dir, "config.yaml"))):
            save_config(cfg, trainer.logger.log_dir)  # a resume keeps the config the run started with
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)  # resuming runs no code
    except MisconfigurationException as err:  # Lightning's word for a setting that cannot work, e.g. resuming
        raise ConfigError(f"trainer: {err}") from None  # epoch 38 with trainer.max_epochs=1: the user's to fix
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{resume}: refused: it holds objects other than tensors and plain data ({err})"
        ) from None
    except SIGTERMException:  # a SystemExit with status 0: the scheduler would take pre-emption for success
        last = os.path.join(trainer.logger.log_dir, "checkpoints", "last.ckpt")
        print(f"SIGTERM: saved {last}; resume=auto continues the run", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    return trainer
