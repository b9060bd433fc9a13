"""The transformer blocks of a VLM: the units FSDP wraps and checkpoints, and what `model.compile` compiles.

Regional compilation (`model.compile: true`): each block instance is compiled on its own with
`nn.Module.compile`, which compiles the module's call in place. So
- the module tree, its class names and the state-dict keys stay as they are (`torch.compile(model)` would wrap
  the model and prefix every key with `_orig_mod.`): checkpoints, LoRA, FSDP's auto-wrap policy by block class,
  activation checkpointing and DDP's parameter hooks see the same modules as without compile;
- the LLM's decoder layers share one piece of code and one set of shapes, so dynamo compiles it once for all
  layers of a kind (their parameters are graph inputs), not once per layer; a whole-model compile would trace
  the Python glue between the parts (image placement, the loss) into one large graph that breaks at every
  data-dependent shape.
Shapes are compiled dynamic from the first call, since LLaVA rows vary in length from batch to batch (a static
first compile would be thrown away at the second length). Generation runs eagerly (`VisionLanguageModel.generate`).
"""

from __future__ import annotations

from torch import nn


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes inside `model`, the units FSDP wraps (and checkpoints).

    From the model itself, so a new encoder or LLM needs no list here: every transformers sub-model's
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, CLIPEncoderLayer, ...; accelerate's
    device_map uses the same names), resolved to the classes found in `model`, plus the elements of
    every `blocks` list (timm's ViT `Block`, SAM's `vision_transformer_sam.Block`).
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    for m in model.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            classes.update(type(b) for b in blocks)
    return classes


def outer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the block instances in `model` (`block_classes`) that sit inside no other block."""
    classes = tuple(block_classes(model))
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, classes) and not any(name.startswith(outer + ".") for outer in found):
            found[name] = m
    return found


def compile_blocks(model: nn.Module) -> int:
    """Compile every outer block of `model` in place (lazily: dynamo runs at each block's first call); returns
    how many. Nothing else is compiled: embeddings, the projector, the loss and the Python between them stay eager.
    """
    blocks = outer_blocks(model)
    for block in blocks.values():
        block.compile(dynamic=True)
    return len(blocks)


def compiled_blocks(model: nn.Module) -> int:
    """How many modules of `model` `nn.Module.compile` has compiled (its `_compiled_call_impl`, torch's own
    attribute for it)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
