"""Experiment configuration: the schema, YAML composition and validation.

An experiment YAML may list `defaults: [base.yaml, encoders/x.yaml]` (paths relative to that file);
bases are merged in order, then the file itself, then command-line `key=value` overrides. The merged
config is checked against the schema below before anything is built: an unknown key, a wrong type,
an unknown encoder / enhancer / reducer / projector name or builder option, or an unknown
`lightning.Trainer` argument fails at once, naming the key and the valid choices.

Encoder, reducer and enhancer blocks (and `model.llm.config`) are taken whole, not merged, when a
later source sets their `name` (`model_type`): `model.encoder.name=clip_vit_l_336` swaps the encoder
without inheriting the old one's options.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import lightning
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")
DEFAULT_EXPERIMENT = os.path.join(EXPERIMENTS_DIR, "quickstart.yaml")
STAGES = ("align", "sft")
PARTS = ("encoder", "reducer", "enhancer", "projector", "llm")
PROJECTORS = ("linear", "mlp2x_gelu")
TEMPLATES = ("plain", "llama3", "vicuna_v1", "chatml", "chat_template")
# Blocks replaced whole when a later source names another `name`.
# Blocks that name what they build, and the key that names it: a source that sets that key replaces the
# whole block instead of merging into it, so no option of the previous encoder / LLM shape leaks in.
NAMED_BLOCKS = {
    "model.encoder": "name",
    "model.reducer": "name",
    "model.enhancer": "name",
    "model.llm.config": "model_type",
}


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key and the valid choices."""


@dataclass
class LLMConfig:
    path: Optional[str] = None  # local HF model directory (or a hub id where a network exists)
    config: Optional[Dict[str, Any]] = None  # inline transformers config ({model_type: llama, ...}) for random init
    dtype: Optional[str] = None  # weights dtype when loading from `path` (e.g. bfloat16); None keeps float32
    attn_implementation: Optional[str] = None  # eager | sdpa | flash_attention_2; None lets transformers pick
    grad_checkpointing: bool = False
    lora: Optional[Dict[str, Any]] = None  # {r, alpha, dropout, target_modules}: train LoRA adapters, base frozen
    quantization: Optional[str] = None  # 4bit | 8bit: QLoRA base via bitsandbytes (CUDA, optional install)


@dataclass
class ModelConfig:
    encoder: Dict[str, Any] = field(default_factory=lambda: {"name": "clip_vit_l_336"})
    reducer: Optional[Dict[str, Any]] = None  # e.g. {name: conv} for SAM -> 256 tokens
    enhancer: Optional[Dict[str, Any]] = None  # e.g. {name: dual_perspective, n: 3}
    projector: str = "mlp2x_gelu"
    mm_projector: Optional[str] = None  # LLaVA / INF-LLaVA stage-1 mm_projector.bin: projector (+ DEM) weights
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: Optional[str] = None  # tokenizer directory; defaults to llm.path
    image_token: str = "<image>"


@dataclass
class BuiltinDataConfig:
    root: str = "data/generated/shapes"
    seed: int = 0
    image_size: int = 64
    num_train: int = 4000
    num_val: int = 200


@dataclass
class DataConfig:
    builtin: Optional[BuiltinDataConfig] = None  # generate the built-in shapes dataset instead of reading files
    train_json: Optional[str] = None
    val_json: Optional[str] = None
    image_folder: Optional[str] = None
    val_fraction: float = 0.0  # held out from train_json when there is no val_json
    template: Optional[str] = None  # None: "plain" for align, the tokenizer's chat template for sft
    system_prompt: Optional[str] = None
    max_length: int = 2048
    pad_to_square: bool = False
    batch_size: int = 16
    val_batch_size: Optional[int] = None
    num_workers: int = 0
    group_by_length: bool = False
    packing: bool = False  # pack training samples into rows of max_length (datamodules/packing.py)
    on_error: str = "raise"  # raise | skip


@dataclass
class OptimConfig:
    lr: float = 1e-3
    lr_per_part: Dict[str, float] = field(default_factory=dict)  # e.g. {llm: 2e-5}
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    num_logged_samples: int = 4  # validation images with question, answer and output in TensorBoard
    max_generate_batches: Optional[int] = None  # None: exact-match over the whole validation set


@dataclass
class CheckpointConfig:
    monitor: str = "val/loss"
    mode: str = "min"
    save_top_k: int = 1
    every_n_train_steps: Optional[int] = None


@dataclass
class LoggingConfig:
    root: str = "runs"
    version: Optional[str] = None  # None: version_<n>, the next free one


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    stage: str = "sft"
    trainable: Optional[List[str]] = None  # None: the stage's default parts
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer keyword arguments
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: Optional[str] = None  # checkpoint path, or "auto" for the newest last.ckpt of this experiment
    init_from: Optional[str] = None  # load module weights (e.g. an alignment run) before training


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file's `defaults` (recursively, in order) followed by the file itself."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(chain + (path,))}")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml's scanner / constructor errors
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: an experiment YAML must be a mapping at the top level")
    defaults = node.pop("defaults", None) or []
    if not isinstance(defaults, (list, ListConfig)):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths, got {defaults!r}")
    sources = []
    for base in defaults:
        sources += _read_yaml(os.path.join(os.path.dirname(path), str(base)), chain + (path,))
    return sources + [(path, node)]


def _merge(cfg: DictConfig, source: DictConfig, where: str) -> DictConfig:
    for block, key in NAMED_BLOCKS.items():
        new = OmegaConf.select(source, block, default=None)
        if isinstance(new, DictConfig) and key in new:
            OmegaConf.update(cfg, block, OmegaConf.to_container(new), merge=False)
    try:
        return OmegaConf.merge(cfg, source)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, where, cfg)) from None


def _explain(err: OmegaConfBaseException, where: str, cfg: DictConfig) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(cfg, section) if section else cfg
    if "not in" in msg and isinstance(node, DictConfig):
        return f"{where}: unknown key '{key}'; valid keys in '{section or '<top>'}': {', '.join(node.keys())}"
    return f"{where}: bad value for '{key}': {msg}"


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose an experiment: schema <- defaults (in order) <- the file <- `key=value` overrides; validate.

    Args:
        path: experiment YAML (default: experiments/quickstart.yaml).
        overrides: command-line style `key=value` strings, e.g. `optim.lr=1e-4`, `model.encoder.name=sam_vit_b`.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    for where, source in _read_yaml(path or DEFAULT_EXPERIMENT):
        cfg = _merge(cfg, source, where)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            source = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        cfg = _merge(cfg, source, f"override {item!r}")
    validate(cfg)
    return cfg


def _choice(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise ConfigError(f"'{key}' = {value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: names against registries, options against builder signatures."""
    from encoders import encoder_options
    from lit_modules.build import ENHANCERS, REDUCERS

    _choice("stage", cfg.stage, STAGES)
    for part in cfg.trainable or []:
        _choice("trainable", part, PARTS)
    for part in cfg.optim.lr_per_part:
        _choice(f"optim.lr_per_part.{part}", part, PARTS)
    _choice("model.projector", cfg.model.projector, PROJECTORS)
    _choice("data.on_error", cfg.data.on_error, ("raise", "skip"))
    if cfg.data.template is not None:
        _choice("data.template", cfg.data.template, TEMPLATES)
    _choice("checkpoint.mode", cfg.checkpoint.mode, ("min", "max"))

    enc = cfg.model.encoder
    if "name" not in enc:
        raise ConfigError("'model.encoder.name' is required")
    try:
        valid = encoder_options(enc.name)
    except ValueError as err:
        raise ConfigError(f"'model.encoder.name': {err}") from None
    _options("model.encoder", enc, valid)
    for block, registry in (("model.reducer", REDUCERS), ("model.enhancer", ENHANCERS)):
        node = OmegaConf.select(cfg, block)
        if node is None:
            continue
        if "name" not in node:
            raise ConfigError(f"'{block}.name' is required; choose one of: {', '.join(registry)}")
        _choice(f"{block}.name", node.name, tuple(registry))
        _options(block, node, [p for p in inspect.signature(registry[node.name]).parameters if p != "encoder"])

    llm = cfg.model.llm
    if (llm.path is None) == (llm.config is None):
        raise ConfigError(
            "set exactly one of 'model.llm.path' (a model directory) and 'model.llm.config' "
            "(an inline transformers config for random init)"
        )
    if llm.config is not None and "model_type" not in llm.config:
        raise ConfigError("'model.llm.config' needs a 'model_type' (e.g. llama, qwen2)")
    from lit_modules.lora import LORA_OPTIONS, QUANTIZATIONS

    for key in llm.lora or {}:
        if key not in LORA_OPTIONS:
            raise ConfigError(f"unknown key 'model.llm.lora.{key}'; valid options: {', '.join(LORA_OPTIONS)}")
    if llm.quantization is not None:
        _choice("model.llm.quantization", llm.quantization, QUANTIZATIONS)
        if llm.lora is None or llm.path is None:
            raise ConfigError(
                "'model.llm.quantization' (QLoRA) needs 'model.llm.lora' and a pretrained 'model.llm.path'"
            )
    data = cfg.data
    if data.builtin is None and data.train_json is None:
        raise ConfigError("set 'data.train_json' (LLaVA-format JSON) or 'data.builtin' (generated data)")
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"'data.val_fraction' must be in [0, 1), got {data.val_fraction}")

    trainer_args = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    for key in cfg.trainer:
        if key not in trainer_args:
            raise ConfigError(
                f"unknown key 'trainer.{key}' (not a lightning.Trainer argument); "
                f"valid: {', '.join(sorted(trainer_args))}"
            )
    from lit_modules.strategy import check_strategy

    try:
        check_strategy(cfg.trainer.get("strategy"))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _options(block: str, node: DictConfig, valid: list[str]) -> None:
    for key in node:
        if key != "name" and key not in valid:
            raise ConfigError(
                f"unknown key '{block}.{key}' for {block.split('.')[-1]} {node.name!r}; "
                f"valid options: {', '.join(valid)}"
            )


def save_config(cfg: DictConfig, run_dir: str) -> str:
    """Write the resolved config next to the run's logs and return its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    OmegaConf.save(cfg, path, resolve=True)
    return path
