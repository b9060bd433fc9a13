"""Train a VLM from one experiment YAML.

    python train.py                                   # experiments/quickstart.yaml
    python train.py experiments/X.yaml key=value ...  # any experiment, with overrides
    python train.py experiments/X.yaml --describe     # parts, parameters and token budget; no weights

config -> seed -> tokenizer -> module -> datamodule -> logger/callbacks -> trainer -> fit.
"""

from __future__ import annotations

import glob
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from config import load_config, save_config
from datamodules import AlignmentDataModule, SFTDataModule, generate_shapes, load_tokenizer
from datamodules.templates import stop_token_ids
from lit_modules.build import build_vision, build_vlm
from lit_modules.checkpoint_io import AtomicCheckpointIO
from lit_modules.strategy import build_strategy
from lit_modules.throughput import StepThroughput
from lit_modules.vlm_module import VLMModule

# `data` keys passed to the DataModule as they are (the rest locate the data: see data_paths).
DATAMODULE_OPTIONS = ("template", "system_prompt", "max_length", "pad_to_square", "batch_size", "val_batch_size",
                      "num_workers", "group_by_length", "packing", "on_error")  # fmt: skip


def data_paths(cfg: DictConfig) -> dict:
    """train_json / val_json / image_folder / val_fraction, generating the built-in dataset if asked."""
    d = cfg.data
    if d.builtin is None:
        return dict(
            train_json=d.train_json, val_json=d.val_json, image_folder=d.image_folder, val_fraction=d.val_fraction
        )
    root = generate_shapes(**OmegaConf.to_container(d.builtin))
    if cfg.stage == "align":
        return dict(
            train_json=f"{root}/align.json", val_json=None, image_folder=root, val_fraction=d.val_fraction or 0.05
        )
    return dict(train_json=f"{root}/sft_train.json", val_json=f"{root}/sft_val.json", image_folder=root, val_fraction=0)


def build_tokenizer(cfg: DictConfig):
    path = cfg.model.tokenizer or cfg.model.llm.path
    if path is None and cfg.data.builtin is not None:  # built-in data ships its own tokenizer
        path = os.path.join(os.path.dirname(data_paths(cfg)["train_json"]), "tokenizer")
    if path is None:
        raise ValueError("set 'model.tokenizer' (a tokenizer directory): the LLM comes from an inline config")
    return load_tokenizer(path, cfg.model.image_token)


def build_model(cfg: DictConfig, tokenizer=None) -> VLMModule:
    tokenizer = tokenizer or build_tokenizer(cfg)
    template = cfg.data.template or ("plain" if cfg.stage == "align" else "chat_template")
    o = cfg.optim
    return VLMModule(build_vlm(cfg.model, tokenizer), tokenizer, stage=cfg.stage, trainable=cfg.trainable,
                     lr=o.lr, lr_per_part=dict(o.lr_per_part), weight_decay=o.weight_decay, betas=tuple(o.betas),
                     warmup_ratio=o.warmup_ratio, min_lr_ratio=o.min_lr_ratio,
                     stop_ids=stop_token_ids(tokenizer, template), max_new_tokens=cfg.eval.max_new_tokens,
                     num_logged_samples=cfg.eval.num_logged_samples, max_generate_batches=cfg.eval.max_generate_batches,
                     config=OmegaConf.to_container(cfg, resolve=True))  # fmt: skip


def build_datamodule(cfg: DictConfig, module: VLMModule | None = None):
    """The stage's DataModule, preprocessing images for the vision tower (`module`'s, or one built from the config)."""
    if module is None:
        vision, tokenizer = build_vision(cfg.model), build_tokenizer(cfg)
    else:
        vision, tokenizer = module.model.vision, module.tokenizer
    cls = AlignmentDataModule if cfg.stage == "align" else SFTDataModule
    vision_spec = dict(image_size=vision.image_size, pixel_mean=vision.pixel_mean, pixel_std=vision.pixel_std)
    data_options = {k: v for k, v in cfg.data.items() if k in DATAMODULE_OPTIONS}
    return cls(tokenizer, **vision_spec, num_image_tokens=vision.num_tokens, **data_paths(cfg), **data_options,
               seed=cfg.seed, image_token=cfg.model.image_token)  # fmt: skip


def resolve_resume(cfg: DictConfig) -> str | None:
    """`resume=auto` -> the newest last.ckpt of this experiment (None if there is none yet)."""
    if cfg.resume != "auto":
        return cfg.resume
    found = glob.glob(os.path.join(cfg.logging.root, cfg.name, "*", "checkpoints", "last.ckpt"))
    return max(found, key=os.path.getmtime) if found else None


def build_trainer(cfg: DictConfig, resume: str | None, module: VLMModule | None = None) -> L.Trainer:
    """`module` is needed for FSDP, which wraps the model's transformer blocks (lit_modules/strategy.py)."""
    # A resumed run keeps writing to its own run directory, so its curves continue in TensorBoard.
    version = cfg.logging.version or (os.path.basename(os.path.dirname(os.path.dirname(resume))) if resume else None)
    logger = TensorBoardLogger(cfg.logging.root, name=cfg.name, version=version, default_hp_metric=False)
    ck, ckpt_dir = cfg.checkpoint, os.path.join(logger.log_dir, "checkpoints")
    callbacks = [
        # last.ckpt on a step schedule (and each epoch end) for resuming; best-*.ckpt when validation improves.
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=ck.every_n_train_steps),
        ModelCheckpoint(
            dirpath=ckpt_dir, monitor=ck.monitor, mode=ck.mode, save_top_k=ck.save_top_k, filename="best-{step}"
        ),
        LearningRateMonitor(logging_interval="step"),
        # samples/s and tokens/s ("items" = non-padding tokens, image tokens included)
        ThroughputMonitor(
            batch_size_fn=lambda b: len(b.get("ids", [])),
            length_fn=lambda b: int(b["attention_mask"].sum()) if "attention_mask" in b else 0,
            window_size=10,
        ),
        # image / text tokens/s, data-wait fraction, peak memory (lit_modules/throughput.py)
        StepThroughput(every_n_steps=cfg.trainer.get("log_every_n_steps") or 50),
    ]
    args = OmegaConf.to_container(cfg.trainer)
    args["strategy"] = build_strategy(args.get("strategy"), module)
    if "deepspeed" not in str(args["strategy"]).lower():  # DeepSpeed writes checkpoint directories itself
        args.setdefault("plugins", []).append(AtomicCheckpointIO())  # a crash mid-save keeps the old file
    # The DataModule's sampler shards data across ranks itself (deterministic, resumable order).
    return L.Trainer(**args, logger=logger, callbacks=callbacks, use_distributed_sampler=False)


def main(argv: list[str]) -> L.Trainer | None:
    describe_only = "--describe" in argv
    argv = [a for a in argv if a != "--describe"]
    path = argv[0] if argv and "=" not in argv[0] else None
    cfg = load_config(path, [a for a in argv if a != path])
    if describe_only:  # parameter counts and token budget, built on the meta device in seconds
        from lit_modules.describe import describe

        print(describe(cfg))
        return None
    L.seed_everything(cfg.seed, workers=True)
    module = build_model(cfg)
    if cfg.init_from:
        state = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        module.on_load_checkpoint(state)  # checks the keys
        module.load_state_dict(state["state_dict"], strict=False)
    datamodule = build_datamodule(cfg, module)
    resume = resolve_resume(cfg)
    trainer = build_trainer(cfg, resume, module)
    if trainer.is_global_zero:
        print(f"run directory: {trainer.logger.log_dir}  (tensorboard --logdir {cfg.logging.root})")
        save_config(cfg, trainer.logger.log_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
