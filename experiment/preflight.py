"""Files a run reads and kernels it asks for, checked before anything is built: a missing one fails in a second,
naming its key.

Without this a missing `data.train_json` or tokenizer directory fails only after the model has been
built (minutes for a 7B recipe) and a run directory has been created, or with a message about hub
repo ids for what was meant as a local path; a kernel this machine cannot run fails at the first step.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from omegaconf import DictConfig

from datamodules.shapes import builtin_tokenizer
from foundation.schema import ConfigError
from model.attention import NEEDS_CUDA


def could_be_hub_id(path: str) -> bool:
    """`org/name` or `name` (not a path that looks local) while the hub may be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return not path.startswith(("/", ".", "~")) and path.count("/") <= 1 and not path.endswith((".json", ".pth"))


def tokenizer_source(cfg: DictConfig) -> tuple[str, str | None]:
    """(the key that names the tokenizer directory, that directory): `model.tokenizer`, else the LLM's
    `model.llm.path`, else the one the built-in dataset ships (`data.builtin`, written when the data is
    generated); the path is None when none of them is set."""
    m = cfg.model
    if m.tokenizer is not None:
        return "model.tokenizer", m.tokenizer
    if m.llm.path is not None:
        return "model.llm.path", m.llm.path
    if cfg.data.builtin is not None:
        return "data.builtin", builtin_tokenizer(cfg.data)
    return "model.tokenizer", None


def _need(key: str, path: str | None, kind: str, hub: bool = False) -> None:
    if path is None or os.path.exists(os.path.expanduser(path)) or (hub and could_be_hub_id(path)):
        return
    raise ConfigError(f"'{key}' = {path!r}: {kind} not found")


def check_files(cfg: DictConfig) -> None:
    """Raise ConfigError for the first file or directory `cfg` names that is not there."""
    m, d = cfg.model, cfg.data
    if d.builtin is None:
        _need("data.train_json", d.train_json, "training data file")
        _need("data.val_json", d.val_json, "validation data file")
        _need("data.image_folder", d.image_folder, "image folder")
        for k, source in enumerate(d.sources):
            _need(f"data.sources[{k}].file", source.file, "training data file")
            _need(f"data.sources[{k}].image_folder", source.image_folder, "image folder")
    tokenizer_key, tokenizer = tokenizer_source(cfg)
    if tokenizer_key != "data.builtin":  # the built-in tokenizer is written with the data, after this check
        _need(tokenizer_key, tokenizer, "tokenizer directory", hub=True)
    _need("model.llm.path", m.llm.path, "LLM directory", hub=True)
    _need("model.encoder.checkpoint", m.encoder.get("checkpoint"), "encoder checkpoint")
    _need("model.mm_projector", m.mm_projector, "mm_projector weights file")
    _need("init_from", cfg.init_from, "checkpoint")
    for k, eval_set in enumerate(cfg.eval.sets):
        _need(f"eval.sets[{k}].file", eval_set.file, "evaluation set file")
        _need(f"eval.sets[{k}].image_folder", eval_set.image_folder, "evaluation image folder")
    if cfg.resume not in (None, "auto"):
        _need("resume", cfg.resume, "checkpoint")


def cpp_compiler() -> str:
    """The C++ compiler torch.compile's CPU backend (inductor) calls: $CXX, else g++ (clang++ on macOS)."""
    return os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")


def check_machine(cfg: DictConfig) -> None:
    """Raise ConfigError when this machine cannot run a kernel the config asks for: `model.llm.packed_attention`
    varlen or flex without a CUDA GPU, and torch.compile for the CPU (`model.compile`) without a C++ compiler.
    The config-only conditions (dtype, accelerator) are experiment.validate's."""
    key, kind = "model.llm.packed_attention", cfg.model.llm.packed_attention
    cuda = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "auto")) != "cpu"
    if kind in NEEDS_CUDA and not cuda:
        raise ConfigError(f"{NEEDS_CUDA[kind]} and this machine has none: use {key}: mask here")
    compiler = cpp_compiler()
    if cfg.model.compile and not cuda and not shutil.which(compiler):
        raise ConfigError(
            f"'model.compile' = true needs a C++ compiler on a CPU ({compiler}, or $CXX) and none was found: install "
            f"one (e.g. apt-get install g++) or set model.compile: false"
        )
