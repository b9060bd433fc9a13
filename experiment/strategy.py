"""`trainer.strategy` from the YAML -> a Lightning strategy (DDP, FSDP, DeepSpeed).

The YAML names a strategy in one of two forms:

    trainer: {strategy: ddp}                      # any name in Lightning's StrategyRegistry, passed as is
    trainer:
      strategy: {name: fsdp, state_dict_type: sharded, activation_checkpointing: true}
      strategy: {name: deepspeed, stage: 2, offload_optimizer: true}
      strategy: {name: ddp, find_unused_parameters: true}

FSDP always auto-wraps the transformer blocks of the built model (the LLM's decoder layers and the
vision tower's blocks, see `model.blocks.block_classes`) with `use_orig_params=True`, because a wrapped unit of a
VLM mixes frozen and trainable parameters (a frozen LLM base next to its LoRA adapters; the root unit,
which holds a frozen encoder's patch embedding next to the trainable projector). The plain names `fsdp` and
`fsdp_cpu_offload` get the same treatment: Lightning's default (one root unit, flat parameters) fails
on a model with frozen parts.

Checkpoints: DDP and single-device runs (and FSDP with `state_dict_type: full`, gathered on rank 0)
write one file through the `CheckpointIO` plugin; FSDP `sharded` and DeepSpeed write a directory
with their own writers. DeepSpeed leaves out frozen weights itself (`exclude_frozen_parameters`,
on by default here), as VLMModule.on_save_checkpoint does for files.
"""

from __future__ import annotations

import datetime
import importlib.util
import inspect
from typing import Any

from torch import nn

from model.blocks import block_classes  # the blocks FSDP wraps are the blocks `model.compile` compiles

# Options a mapping may give per strategy name (beyond `name`); anything else fails in experiment.validate.
# ddp: DDPStrategy's own arguments plus DistributedDataParallel keyword arguments (passed through).
DDP_OPTIONS = (
    "process_group_backend",
    "timeout",
    "start_method",
    "find_unused_parameters",
    "static_graph",
    "gradient_as_bucket_view",
    "bucket_cap_mb",
    "broadcast_buffers",
)
# fsdp: FSDPStrategy's arguments that YAML can express; `activation_checkpointing: true` checkpoints the
# wrapped blocks. `auto_wrap_policy` / `mixed_precision` objects are not YAML (precision comes from
# `trainer.precision`).
FSDP_OPTIONS = (
    "sharding_strategy",
    "state_dict_type",
    "cpu_offload",
    "activation_checkpointing",
    "process_group_backend",
    "timeout",
    "use_orig_params",
    "limit_all_gathers",
    "forward_prefetch",
    "sync_module_states",
)
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
# Lightning's own arguments that are not options of a YAML strategy.
_INTERNAL = {
    "self",
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
    "kwargs",
}
DEEPSPEED_INSTALL = "DeepSpeed is not installed (an optional dependency): pip install deepspeed"


def deepspeed_options() -> tuple[str, ...]:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return tuple(p for p in inspect.signature(DeepSpeedStrategy.__init__).parameters if p not in _INTERNAL)


def strategy_options() -> dict[str, tuple[str, ...]]:
    return {"ddp": DDP_OPTIONS, "fsdp": FSDP_OPTIONS, "deepspeed": deepspeed_options()}


def check_strategy(spec: Any, key: str = "trainer.strategy", installed: bool = False) -> None:
    """Raise ValueError naming `key` and the valid choices for an unknown strategy name or option;
    with `installed`, also when DeepSpeed is asked for but not installed (config validation leaves
    that to `build_strategy`, so a DeepSpeed recipe still validates and `--describe`s anywhere).
    `spec` is a string, a mapping or None."""
    from lightning.pytorch.strategies import StrategyRegistry

    if spec is None:
        return
    if isinstance(spec, str):
        valid = ["auto", *StrategyRegistry.available_strategies()]
        if spec not in valid:
            raise ValueError(
                f"'{key}' = {spec!r} is not a Lightning strategy; choose one of: {', '.join(valid)} "
                f"(or a mapping {{name: ddp|fsdp|deepspeed, ...options}})"
            )
        name = "deepspeed" if spec.startswith("deepspeed") else spec
    else:
        spec = dict(spec)
        options = strategy_options()
        if "name" not in spec:
            raise ValueError(f"'{key}.name' is required; choose one of: {', '.join(options)}")
        name = spec["name"]
        if name not in options:
            raise ValueError(f"'{key}.name' = {name!r} is not valid; choose one of: {', '.join(options)}")
        for opt in spec:
            if opt != "name" and opt not in options[name]:
                raise ValueError(
                    f"unknown key '{key}.{opt}' for strategy {name!r}; valid options: {', '.join(options[name])}"
                )
        if name == "fsdp":
            if spec.get("state_dict_type", "full") not in ("full", "sharded"):
                raise ValueError(
                    f"'{key}.state_dict_type' = {spec['state_dict_type']!r} is not valid; choose one of: full, sharded"
                )
            if spec.get("sharding_strategy", "FULL_SHARD") not in FSDP_SHARDING:
                raise ValueError(
                    f"'{key}.sharding_strategy' = {spec['sharding_strategy']!r} is not valid; "
                    f"choose one of: {', '.join(FSDP_SHARDING)}"
                )
        if name == "deepspeed" and spec.get("stage", 2) not in (1, 2, 3):
            raise ValueError(f"'{key}.stage' = {spec['stage']!r} is not valid; choose one of: 1, 2, 3")
    if installed and name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"'{key}' asks for DeepSpeed: {DEEPSPEED_INSTALL}")


def build_strategy(spec: Any, model: nn.Module | None = None):
    """The `strategy` argument for `lightning.Trainer`: a registry name as is, or a strategy object.

    Args:
        spec: `trainer.strategy` from the config (None, a name, or `{name: ..., **options}`).
        model: the built model (the LightningModule); FSDP wraps its `block_classes`.
    """
    if spec is None:
        return "auto"
    if isinstance(spec, str):
        if spec not in ("fsdp", "fsdp_cpu_offload"):
            check_strategy(spec, installed=True)
            return spec
        spec = {"name": "fsdp", "cpu_offload": spec == "fsdp_cpu_offload"}
    spec = dict(spec)
    check_strategy(spec, installed=True)
    name = spec.pop("name")
    if "timeout" in spec:  # seconds in YAML; Lightning wants a timedelta
        spec["timeout"] = datetime.timedelta(seconds=spec["timeout"])
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**spec)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        if model is None:
            raise ValueError("an FSDP strategy needs the built model to find the blocks to wrap")
        blocks = block_classes(model)
        if spec.pop("activation_checkpointing", False):
            spec["activation_checkpointing_policy"] = blocks
        spec.setdefault("use_orig_params", True)
        return FSDPStrategy(auto_wrap_policy=blocks, **spec)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    spec.setdefault("exclude_frozen_parameters", True)
    return DeepSpeedStrategy(**spec)
