"""A trained run back from disk, without the Trainer: its checkpoint -> `VLMModule` -> `Predictor`.

module = load_module("runs/quickstart/defaults/checkpoints/last.ckpt")
predictor = load_predictor("runs/quickstart/defaults")      # or an export directory (inference/export.py)
"""

from __future__ import annotations

import glob
import os

from experiment.assemble import build_datamodule, build_module
from experiment.config import config_from_dict, load_config
from foundation.schema import ConfigError
from inference.exported import ExportedPredictor, is_export
from lit_modules.checkpoint_io import load_weights, read_checkpoint
from lit_modules.predictor import Predictor
from lit_modules.vlm_module import VLMModule


def find_checkpoint(path: str, which: str = "last") -> str:
    """A checkpoint file from a file or a run directory (`which`: "last", or "best" = the best-*.ckpt kept)."""
    if os.path.isfile(path):
        return path
    folder = os.path.join(path, "checkpoints")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: neither a checkpoint file nor a run directory (no checkpoints/ in it)")
    pattern = "last*.ckpt" if which == "last" else "best-*.ckpt"
    found = glob.glob(os.path.join(folder, pattern))
    if not found:
        raise FileNotFoundError(f"{folder}: no {pattern}")
    return max(found, key=os.path.getmtime)


def load_module(checkpoint: str, overrides: list[str] | tuple[str, ...] = ()) -> VLMModule:
    """The documented loader: a trained VLMModule from its checkpoint alone, no YAML needed.

    The checkpoint holds the resolved config (`hyper_parameters["config"]`); the model is rebuilt
    from it with `build_module` and the trained weights are loaded. `overrides` (`key=value`) adjust
    the stored config first, e.g. `model.llm.path=...` when the base LLM moved.
    """
    state = read_checkpoint(checkpoint)
    cfg = config_from_dict(state["hyper_parameters"]["config"], overrides, where=checkpoint)
    module = build_module(cfg)
    load_weights(module, state)
    return module


def load_predictor(path: str, checkpoint: str = "last", overrides: list[str] | tuple[str, ...] = ()) -> Predictor:
    """A `Predictor` from a run directory (its last.ckpt, or the best with checkpoint="best") or a
    checkpoint file; `overrides` adjust the stored config (`key=value`). An export directory (inference/export.py)
    gives an `ExportedPredictor` (same interface; `checkpoint` and `overrides` do not apply). An experiment YAML
    gives its model as the config builds it, before any training (weights from their sources, e.g. a released
    LLaVA's with `model.from_hf`): a baseline answered through the project's own pipeline."""
    if os.path.isdir(path) and is_export(path):
        if overrides:
            raise ConfigError(f"{path} is an exported model: config overrides {list(overrides)} do not apply")
        return ExportedPredictor(path)
    if path.endswith((".yaml", ".yml")) and os.path.isfile(path):
        cfg = load_config(path, overrides)
        module = build_module(cfg)
        return Predictor(module, build_datamodule(cfg, module.tokenizer))
    module = load_module(find_checkpoint(path, checkpoint), overrides)
    cfg = config_from_dict(module.hparams["config"], overrides)
    return Predictor(module, build_datamodule(cfg, module.tokenizer))
