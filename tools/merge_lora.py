"""Fold a LoRA run's adapters into plain weights.

    python -m tools.merge_lora runs/X/defaults/checkpoints/last.ckpt merged/X

A LoRA checkpoint holds the adapters, projector and enhancer (and whatever else trained), not the
frozen base LLM: that comes back from `model.llm.path`. Here the run's model is rebuilt from the
checkpoint alone (`inference.load.load_module`), peft's `merge_and_unload` folds
W + (alpha / r) * B A into each adapted weight, and `<out>` receives:

    llm/          the merged LLM and the tokenizer (transformers `save_pretrained` layout)
    model.ckpt    the whole VLM's state dict without LoRA, loadable into a model built without `lora`
                  (also as `init_from=<out>/model.ckpt`)
    config.yaml   the run's config with `model.llm.lora` / `quantization` removed and
                  `model.llm.path` -> `<out>/llm`: `python train.py <out>/config.yaml` builds the merged model
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from omegaconf import OmegaConf

from foundation.errors import run_command
from inference.load import load_module
from lit_modules.checkpoint_io import CheckpointError, read_checkpoint
from model.lora import is_lora


def merge_lora(checkpoint: str, out_dir: str) -> str:
    """Write the merged model to `out_dir` (see the module docstring); returns the path of model.ckpt."""
    module = load_module(checkpoint)
    cfg = OmegaConf.create(module.hparams["config"])
    state = read_checkpoint(checkpoint)
    llm = module.model.llm
    if not is_lora(llm):
        raise CheckpointError(f"{checkpoint}: the run has no LoRA adapters (model.llm.lora is not set)")
    if cfg.model.llm.path is None and any(k.startswith("model.llm.") for k in state.get("frozen_keys", [])):
        raise CheckpointError(
            f"{checkpoint}: the base LLM was randomly initialised (model.llm.config) and, being "
            "frozen, is not in the checkpoint; there is nothing to merge the adapters into"
        )
    if cfg.model.llm.quantization is not None:
        raise CheckpointError(
            f"{checkpoint}: merging into a 4 / 8-bit base loses precision; rebuild the run with "
            "quantization=null (same adapters, bf16 / fp32 base) and merge that"
        )
    module.model.llm = llm.merge_and_unload()
    llm_dir = os.path.join(out_dir, "llm")
    module.model.llm.save_pretrained(llm_dir)
    module.tokenizer.save_pretrained(llm_dir)
    cfg.model.llm.lora = None
    cfg.model.llm.path = os.path.abspath(llm_dir)
    cfg.model.llm.config = None
    cfg.model.llm.dtype = None  # saved as the dtype it was trained in
    if cfg.model.tokenizer is None:
        cfg.model.tokenizer = os.path.abspath(llm_dir)
    OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    path = os.path.join(out_dir, "model.ckpt")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": OmegaConf.to_container(cfg)}}, path)
    return path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a LoRA run's checkpoint (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="directory for llm/, model.ckpt and config.yaml")
    args = parser.parse_args(argv)
    path = merge_lora(args.checkpoint, args.out_dir)
    print(f"merged model: {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
