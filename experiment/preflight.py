"""Files a run reads, checked before anything is built: a missing one fails in a second, naming its key.

Without this a missing `data.train_json` or tokenizer directory fails only after the model has been
built (minutes for a 7B recipe) and a run directory has been created, or with a message about hub
repo ids for what was meant as a local path.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from foundation.schema import ConfigError


def could_be_hub_id(path: str) -> bool:
    """`org/name` or `name` (not a path that looks local) while the hub may be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return not path.startswith(("/", ".", "~")) and path.count("/") <= 1 and not path.endswith((".json", ".pth"))


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
    tokenizer_key = "model.tokenizer" if m.tokenizer is not None else "model.llm.path"
    _need(tokenizer_key, m.tokenizer or m.llm.path, "tokenizer directory", hub=True)
    _need("model.llm.path", m.llm.path, "LLM directory", hub=True)
    _need("model.encoder.checkpoint", m.encoder.get("checkpoint"), "encoder checkpoint")
    _need("model.mm_projector", m.mm_projector, "mm_projector weights file")
    _need("init_from", cfg.init_from, "checkpoint")
    for k, eval_set in enumerate(cfg.eval.sets):
        _need(f"eval.sets[{k}].file", eval_set.file, "evaluation set file")
        _need(f"eval.sets[{k}].image_folder", eval_set.image_folder, "evaluation image folder")
    if cfg.resume not in (None, "auto"):
        _need("resume", cfg.resume, "checkpoint")
