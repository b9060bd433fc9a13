"""Checks the schema cannot express: names against the registries, options against builder signatures.

Every list of valid names comes from a registry (`Registry.names()` / `.options()`), so a newly
registered encoder, reducer, enhancer, projector or template is accepted here without an edit.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Iterable

import lightning
from omegaconf import DictConfig, OmegaConf

from datamodules.templates import TEMPLATES
from encoders import BLOCK_REGISTRIES
from experiment.strategy import check_strategy
from foundation.registry import Registry
from foundation.schema import NAMED_BLOCKS, ConfigError, source_name
from foundation.stages import PARTS, STAGES
from foundation.typecheck import describe, fits
from lit_modules.lr_schedule import EXTENSIONS
from lit_modules.optimizer import STATES
from metrics import METRICS
from model.attention import NEEDS_CUDA, PACKED_ATTENTION
from model.lora import LORA_OPTIONS, QUANTIZATIONS
from model.projector import PROJECTORS


def choice(key: str, value: Any, valid: Iterable) -> None:
    valid = list(valid)
    if value not in valid:
        raise ConfigError(f"'{key}' = {value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def registered(key: str, name: Any, registry: Registry) -> None:
    if name not in registry:
        raise ConfigError(f"'{key}' = {name!r} is not valid; choose one of: {registry.choices()}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key and the valid choices for the first problem found."""
    registered("stage", cfg.stage, STAGES)
    for part in cfg.trainable or []:
        choice("trainable", part, PARTS)
    for part in cfg.optim.lr_per_part:
        choice(f"optim.lr_per_part.{part}", part, PARTS)
    choice("data.on_error", cfg.data.on_error, ("raise", "skip"))
    choice("data.multi_image", cfg.data.multi_image, ("base", "tiles"))
    _video_time_prompt(cfg.data.video_time_prompt)
    choice("checkpoint.mode", cfg.checkpoint.mode, ("min", "max"))
    choice("optim.extend", cfg.optim.extend, EXTENSIONS)
    registered("model.projector", cfg.model.projector, PROJECTORS)
    if cfg.data.template is not None:
        registered("data.template", cfg.data.template, TEMPLATES)

    for kind in NAMED_BLOCKS:
        block, registry = f"model.{kind}", BLOCK_REGISTRIES[kind]
        node = OmegaConf.select(cfg, block)
        if node is None:
            continue
        if "name" not in node:
            raise ConfigError(f"'{block}.name' is required; choose one of: {registry.choices()}")
        registered(f"{block}.name", node.name, registry)
        valid = registry.options(node.name)
        for key in node:
            if key != "name" and key not in valid:
                raise ConfigError(
                    f"unknown key '{block}.{key}' for {registry.kind} {node.name!r}; valid options: {', '.join(valid)}"
                )
        _check_types(block, OmegaConf.to_container(node, resolve=True), registry.hints(node.name))

    _validate_from_hf(cfg.model)
    _validate_llm(cfg.model.llm)
    _validate_packed_attention(cfg)
    names = [s.name for s in cfg.eval.sets]
    for k, eval_set in enumerate(cfg.eval.sets):
        key = f"eval.sets[{k}]"
        registered(f"{key}.metric", eval_set.metric, METRICS)
        valid = METRICS.options(eval_set.metric)
        for option in eval_set.options:
            if option not in valid:
                raise ConfigError(
                    f"unknown key '{key}.options.{option}' for metric {eval_set.metric!r}; valid options: "
                    f"{', '.join(valid)}"
                )
        _check_types(f"{key}.options", OmegaConf.to_container(eval_set.options), METRICS.hints(eval_set.metric))
        if not eval_set.file:
            raise ConfigError(f"'{key}.file' is required (a JSON / JSONL file of questions and references)")
        if names.count(eval_set.name) > 1:
            raise ConfigError(f"'{key}.name' = {eval_set.name!r} is used by two sets; names must be unique")
    data = cfg.data
    if data.builtin is None and data.train_json is None and not data.sources:
        raise ConfigError(
            "set 'data.train_json' (LLaVA-format JSON), 'data.sources' (a mixture) or 'data.builtin' (generated data)"
        )
    _validate_sources(data)
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise ConfigError(f"'data.max_bad_fraction' must be in [0, 1], got {data.max_bad_fraction}")
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"'data.val_fraction' must be in [0, 1), got {data.val_fraction}")

    _check_ranges(cfg)
    trainer_args = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"} - RUNNER_SETS
    for key in cfg.trainer:
        if key in RUNNER_SETS:
            raise ConfigError(f"'trainer.{key}' is set by the runner (experiment/runner.py), not by the config")
        if key not in trainer_args:
            raise ConfigError(
                f"unknown key 'trainer.{key}' (not a lightning.Trainer argument); "
                f"valid: {', '.join(sorted(trainer_args))}"
            )
    trainer_hints = typing.get_type_hints(lightning.Trainer.__init__)
    checked = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in ("strategy", "plugins")
    }
    _check_types("trainer", checked, trainer_hints)
    try:
        check_strategy(cfg.trainer.get("strategy"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _validate_in_backward(cfg.trainer, cfg.optim.in_backward)
    _validate_states(cfg.trainer, cfg.optim)


def _validate_in_backward(trainer: DictConfig, in_backward: bool) -> None:
    """`optim.in_backward` steps each parameter as soon as its gradient of this batch is complete
    (lit_modules/optim_in_backward.py): refused with whatever needs every gradient before any step. Whether "auto"
    devices come to one device is known only on the machine: VLMModule checks the strategy it gets."""
    if not in_backward:
        return
    key = "'optim.in_backward'"
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ConfigError(
            f"{key} steps every parameter at each batch's backward, so it cannot accumulate gradients over "
            f"trainer.accumulate_grad_batches = {accumulate} batches: set one of them off"
        )
    if trainer.get("gradient_clip_val"):
        raise ConfigError(
            f"{key} steps each parameter before the others have gradients, so it cannot clip by their global norm "
            f"(trainer.gradient_clip_val = {trainer.gradient_clip_val}): set trainer.gradient_clip_val: null"
        )
    name = _strategy_name(trainer)
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if name not in (None, "auto", "single_device") or _several(devices) or nodes != 1:
        raise ConfigError(
            f"{key} runs on one device only (trainer.strategy = {name or 'auto'}, devices = {devices}, "
            f"num_nodes = {nodes}): DDP, FSDP and DeepSpeed reduce gradients after the in-backward steps; set "
            f"trainer.devices: 1"
        )
    precision = str(trainer.get("precision", "32-true"))
    if precision in ("16", "16-mixed"):
        raise ConfigError(
            f"{key} cannot go with trainer.precision = {precision}: its loss scaler unscales and checks the gradients "
            f"after backward, when the parameters have stepped; use bf16-mixed or 32-true"
        )


def _strategy_name(trainer: DictConfig) -> str | None:
    """`trainer.strategy`'s name, from either form (a name, or a mapping with `name`); None when unset."""
    strategy = trainer.get("strategy")
    return strategy.get("name") if isinstance(strategy, DictConfig) else strategy


def _validate_states(trainer: DictConfig, optim: DictConfig) -> None:
    """`optim.states`: one of STATES; 8-bit states are bitsandbytes' AdamW8bit, which has no fused option and is not
    tested under FSDP or DeepSpeed (both shard the optimizer states themselves, lit_modules/optimizer.py)."""
    key = f"'optim.states' = {optim.states!r}"
    if optim.states not in STATES:
        raise ConfigError(f"{key} is not valid; choose one of: {', '.join(STATES)}")
    if optim.states == "fp32":
        return
    if optim.fused:
        raise ConfigError(
            f"'optim.fused' is torch's fp32 AdamW kernel, but {key} steps with bitsandbytes' own: set "
            f"optim.fused: false"
        )
    name = str(_strategy_name(trainer))
    if name.startswith(("fsdp", "deepspeed")):
        raise ConfigError(
            f"{key} runs on one device or under DDP; trainer.strategy = {name} shards the optimizer states itself: "
            f"set optim.states: fp32"
        )


AMOUNTS = ("weight", "repeat", "num_samples")


def _validate_sources(data: DictConfig) -> None:
    """Each source of a mixture: a file, at most one amount and none negative, a known template, a unique name;
    and not every weight 0. Errors name the source."""
    if not data.sources:
        return
    if data.train_json is not None or data.builtin is not None:
        raise ConfigError("set 'data.sources' or 'data.train_json' / 'data.builtin', not both")
    names = [source_name(s) for s in data.sources]
    for k, source in enumerate(data.sources):
        key, name = f"data.sources[{k}]", names[k]
        if bool(source.file) == bool(source.shards):
            raise ConfigError(
                f"give one of '{key}.file' (a LLaVA-format JSON or JSONL file) and '{key}.shards' (litdata shards, "
                f"python -m tools.write_shards) for source {name!r}"
            )
        if source.shards and data.group_by_length:
            raise ConfigError(
                f"source {name!r} ({key}.shards) cannot be grouped by length: its token lengths are known only once "
                f"a record is read; set data.group_by_length=false"
            )
        given = [a for a in AMOUNTS if source[a] is not None]
        if len(given) > 1:
            raise ConfigError(f"source {name!r} ({key}) sets {' and '.join(given)}; give one of {', '.join(AMOUNTS)}")
        if given and source[given[0]] < 0:
            raise ConfigError(f"'{key}.{given[0]}' = {source[given[0]]} for source {name!r} is negative")
        if source.template is not None:
            registered(f"{key}.template", source.template, TEMPLATES)
        if names.count(name) > 1:
            raise ConfigError(f"source name {name!r} ({key}) is used twice; set 'name' to tell them apart")
    weighted = [n for n, s in zip(names, data.sources) if s.weight is not None]
    if weighted and all(s.weight == 0 for s in data.sources if s.weight is not None):
        raise ConfigError(f"every weight of data.sources is 0 ({', '.join(weighted)}): nothing would be sampled")


def _check_types(block: str, values: dict, hints: dict) -> None:
    for key, value in values.items():
        if key in hints and not fits(value, hints[key]):
            raise ConfigError(f"'{block}.{key}' = {value!r} is not valid; it must be {describe(hints[key])}")


# (key, test, what it must be): values the schema's types admit but no run can use.
RANGES = (
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.val_batch_size", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.max_length", lambda v: v >= 1, ">= 1"),
    ("data.video_frames", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.index_workers", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("optim.lr", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.num_logged_samples", lambda v: v >= 0, ">= 0"),
    ("eval.max_generate_batches", lambda v: v is None or v >= 0, ">= 0 or null"),
    ("checkpoint.save_top_k", lambda v: v >= -1, ">= -1"),
    ("checkpoint.every_n_train_steps", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.every_n_steps", lambda v: v is None or v >= 1, ">= 1 or null"),
)
# lightning.Trainer arguments the runner passes itself.
RUNNER_SETS = {"logger", "callbacks", "use_distributed_sampler"}


def _check_ranges(cfg: DictConfig) -> None:
    for key, test, must in RANGES:
        value = OmegaConf.select(cfg, key)
        if not test(value):
            raise ConfigError(f"'{key}' = {value!r} is not valid; it must be {must}")
    for part, lr in cfg.optim.lr_per_part.items():
        if lr < 0:
            raise ConfigError(f"'optim.lr_per_part.{part}' = {lr!r} is not valid; it must be >= 0")


def _validate_llm(llm: DictConfig) -> None:
    if (llm.path is None) == (llm.config is None):
        raise ConfigError(
            "set exactly one of 'model.llm.path' (a model directory) and 'model.llm.config' "
            "(an inline transformers config for random init)"
        )
    if llm.config is not None and "model_type" not in llm.config:
        raise ConfigError("'model.llm.config' needs a 'model_type' (e.g. llama, qwen2)")
    for key in llm.lora or {}:
        if key not in LORA_OPTIONS:
            raise ConfigError(f"unknown key 'model.llm.lora.{key}'; valid options: {', '.join(LORA_OPTIONS)}")
    if llm.quantization is not None:
        choice("model.llm.quantization", llm.quantization, QUANTIZATIONS)
        if llm.lora is None or llm.path is None:
            raise ConfigError(
                "'model.llm.quantization' (QLoRA) needs 'model.llm.lora' and a pretrained 'model.llm.path'"
            )


def _validate_packed_attention(cfg: DictConfig) -> None:
    """What the config alone says about `model.llm.packed_attention` (model/attention.py); whether this machine has
    the device and compiler it needs is `experiment.preflight.check_machine`'s."""
    llm, key = cfg.model.llm, "model.llm.packed_attention"
    choice(key, llm.packed_attention, PACKED_ATTENTION)
    kind = llm.packed_attention
    if kind == "mask":
        return
    if not cfg.data.packing:
        raise ConfigError(f"'{key}' = {kind!r} is the attention of packed rows; set data.packing: true (or drop it)")
    if llm.attn_implementation not in (None, "sdpa"):
        raise ConfigError(
            f"'{key}' = {kind!r} runs unpacked batches (validation, generation) with sdpa, so it cannot go with "
            f"'model.llm.attn_implementation' = {llm.attn_implementation!r}: unset that, or use {key}: mask"
        )
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu":
        raise ConfigError(f"{NEEDS_CUDA[kind]} but trainer.accelerator is cpu: use {key}: mask on a CPU")
    if kind != "varlen":
        return
    precision = str(cfg.trainer.get("precision", "32-true"))
    if not precision.startswith(("bf16", "16")) and llm.dtype not in ("bfloat16", "float16"):
        raise ConfigError(
            f"'{key}' = 'varlen' runs in bfloat16 / float16 only (PyTorch's flash and cuDNN varlen kernels), but "
            f"trainer.precision is {precision} and model.llm.dtype {llm.dtype}: set trainer.precision: bf16-mixed, "
            f"or use {key}: flex (any dtype) or mask"
        )


def _several(devices: Any) -> bool:
    """Whether Lightning's `devices` (an int, -1 for all, "auto", "2", "0,1" or a list of indices) names more than
    one device; "auto" is left to the run."""
    if isinstance(devices, str):
        if devices == "auto":
            return False
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if isinstance(devices, int):
        return devices == -1 or devices > 1
    return len(devices) > 1


# Sources of weights that a LLaVA directory (`model.from_hf`) replaces: set with it, they are refused.
OTHER_WEIGHTS = ("llm.path", "mm_projector", "encoder.checkpoint", "reducer", "enhancer")


def _validate_from_hf(model: DictConfig) -> None:
    if model.from_hf is None:
        return
    for key in OTHER_WEIGHTS:
        value = OmegaConf.select(model, key)
        if value is not None:
            raise ConfigError(
                f"'model.{key}' = {OmegaConf.to_container(value) if isinstance(value, DictConfig) else value!r} is "
                f"set, but 'model.from_hf' = {model.from_hf!r} gives every weight of the model; set it to null"
            )


def _video_time_prompt(text: str | None) -> None:
    """`data.video_time_prompt` fills {duration}, {frames} and {times} only (datamodules/video.py)."""
    if text is None:
        return
    try:
        text.format(duration=0.0, frames=1, times="0.00s")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"'data.video_time_prompt' = {text!r} does not format ({type(err).__name__}: {err}); it may use "
            "{duration}, {frames} and {times}"
        ) from None
