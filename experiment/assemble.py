"""A run's pieces from its resolved config: the tokenizer, the stage's DataModule and the VLMModule.

Training (`experiment.runner.run`) and loading a trained run (`inference.load.load_module`) both build
through these, so a loaded model is the model that trained.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from datamodules import ImageSpec, LLaVADataModule, builtin_data, load_tokenizer
from datamodules.templates import stop_token_ids
from experiment.preflight import tokenizer_source
from foundation.schema import ConfigError
from foundation.stages import STAGES
from lit_modules.vlm_module import VLMModule
from model.build import build_vision, build_vlm


def tokenizer_path(cfg: DictConfig) -> str:
    """The tokenizer directory (`experiment.preflight.tokenizer_source`, which preflight checks)."""
    _, path = tokenizer_source(cfg)
    if path is None:
        raise ConfigError("set 'model.tokenizer' (a tokenizer directory): the LLM comes from an inline config")
    return path


def build_tokenizer(cfg: DictConfig):
    """The LLM's tokenizer with the image placeholder and a pad token (generates built-in data if needed)."""
    if tokenizer_source(cfg)[0] == "data.builtin":
        builtin_data(OmegaConf.to_object(cfg.data), cfg.stage)  # the built-in dataset ships its tokenizer
    return load_tokenizer(tokenizer_path(cfg), cfg.model.image_token)


def build_datamodule(cfg: DictConfig, tokenizer=None) -> LLaVADataModule:
    """The stage's DataModule; the vision tower's input spec is read from a meta-device build (no weights)."""
    tokenizer = tokenizer or build_tokenizer(cfg)
    with torch.device("meta"):
        image = ImageSpec.of(build_vision(cfg.model))
    data = builtin_data(OmegaConf.to_object(cfg.data), cfg.stage)
    return LLaVADataModule(tokenizer, data, image, stage=cfg.stage, seed=cfg.seed, image_token=cfg.model.image_token)


def build_module(cfg: DictConfig, tokenizer=None) -> VLMModule:
    """The VLMModule of `cfg`: `build_vlm` (weights from their sources) frozen for the stage."""
    tokenizer = tokenizer or build_tokenizer(cfg)
    template = STAGES.get(cfg.stage).template(cfg.data.template)
    return VLMModule(
        build_vlm(cfg.model, tokenizer),
        tokenizer,
        stage=cfg.stage,
        trainable=cfg.trainable,
        optim=OmegaConf.to_object(cfg.optim),
        evaluation=OmegaConf.to_object(cfg.eval),
        stop_ids=stop_token_ids(tokenizer, template),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
