"""The composition root: `ModelConfig` -> encoder -> reducer -> enhancer -> projector -> LLM.

Every model this repo makes comes from `build_vlm`: training (experiment/runner.py), `--describe` (the same
call under `torch.device("meta")`), the DataModule's preprocessing spec (`build_vision` on meta),
checkpoint loading and LoRA merging. The modules below take plain keyword arguments and can be built
and tested alone (as SAM's `_build_sam` wires its parts); names are looked up in the registries.

On the meta device nothing is read but architectures: encoders skip their weights (see
encoders/base.py), the LLM is made from its config.json, `mm_projector` is not loaded and a
quantized LLM is built unquantized (bitsandbytes packs weights when it loads them).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from encoders import BLOCK_REGISTRIES, VisionEncoder
from encoders.weights import on_meta_device
from foundation.schema import NAMED_BLOCKS, ConfigError, LLMConfig, ModelConfig
from model.attention import IMPLEMENTATIONS
from model.blocks import compile_blocks
from model.llava_hf import load_newline, load_part, load_vision, read_llava_weights
from model.projector import PROJECTORS
from model.projector_weights import load_mm_projector
from model.vlm import VisionLanguageModel


def _plain(node) -> dict | None:
    if node is None:
        return None
    return dict(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else dict(node)


def build_vision(model: ModelConfig | DictConfig) -> VisionEncoder:
    """The vision tower of `model`: the encoder, then the optional reducer, then the optional enhancer
    (`NAMED_BLOCKS`, in that order), each built by its registry; every block after the encoder wraps the tower."""
    vision = None
    for kind in NAMED_BLOCKS:
        block = getattr(model, kind)
        if block is not None:
            opts = _plain(block)
            wrapped = () if vision is None else (vision,)
            vision = BLOCK_REGISTRIES[kind].build(opts.pop("name"), *wrapped, **opts)
    return vision


def llm_config(llm: LLMConfig | DictConfig):
    """The LLM's transformers config: inline `config`, or `path`'s config.json (never the network)."""
    if llm.config is not None:
        inline = _plain(llm.config)
        return AutoConfig.for_model(inline.pop("model_type"), **inline)
    try:  # a local directory, or a hub id already in the local cache
        return AutoConfig.from_pretrained(llm.path, local_files_only=on_meta_device())
    except (OSError, ValueError):
        if not on_meta_device():
            raise
        raise ConfigError(
            f"the LLM's architecture is needed, but {llm.path!r} has no config.json on this machine. Copy "
            f"the model's config.json (not its weights) there, or pass it inline, e.g. for Vicuna-7B: "
            f"model.llm.path=null 'model.llm.config={{model_type: llama, hidden_size: 4096, "
            f"intermediate_size: 11008, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 32, "
            f"vocab_size: 32000, max_position_embeddings: 4096}}'"
        ) from None


def build_llm(
    llm: LLMConfig | DictConfig, vocab_size: int | None = None, weights: tuple[str, dict] | None = None
) -> PreTrainedModel:
    """Any transformers causal LM, from a directory / hub id, or randomly initialised from an inline config.

    Args:
        llm: the `model.llm` group: path or inline config, dtype, attention kernel (`packed_attention` varlen /
            flex: that kernel's registered implementation, model/attention.py), gradient checkpointing, LoRA
            adapters (the result is then a `peft.PeftModel`, see model/lora.py), QLoRA quantization (CUDA only;
            needs `lora`).
        vocab_size: grow the embeddings to at least this size (tokens added for <image> / <pad>).
        weights: (where from, state dict) for the inline config's model, loaded before the vocabulary grows
            and LoRA wraps it (a LLaVA directory's LLM, model/llava_hf.py); its random init is skipped.
    """
    attn = IMPLEMENTATIONS.get(llm.packed_attention, llm.attn_implementation)
    kwargs = {"attn_implementation": attn} if attn else {}
    dtype = getattr(torch, llm.dtype) if llm.dtype else None
    quantized = llm.quantization is not None and not on_meta_device()
    if quantized:
        from model.lora import quantization_config, quantized_device_map

        kwargs.update(
            quantization_config=quantization_config(llm.quantization, dtype), device_map=quantized_device_map()
        )
    if llm.path is not None and not on_meta_device():
        model = AutoModelForCausalLM.from_pretrained(llm.path, dtype=dtype, **kwargs)
    else:
        with no_init_weights() if weights is not None else nullcontext():  # every tensor is loaded next
            model = AutoModelForCausalLM.from_config(llm_config(llm), **kwargs)
        if weights is not None:
            load_part(weights[0], "LLM", model, weights[1])
            if dtype is not None:
                model.to(dtype)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        # transformers initialises new rows from the old rows' mean and covariance: no values on meta
        model.resize_token_embeddings(vocab_size, mean_resizing=not on_meta_device())
    if llm.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps the mode it finds
    if llm.lora is not None:
        from model.lora import apply_lora

        model = apply_lora(model, **_plain(llm.lora), quantized=quantized, grad_checkpointing=llm.grad_checkpointing)
    return model


def build_vlm(model: ModelConfig | DictConfig, tokenizer=None) -> VisionLanguageModel:
    """The VLM of the experiment's `model` section.

    Args:
        model: the `model` group.
        tokenizer: the LLM's tokenizer, already holding the image placeholder (datamodules.load_tokenizer);
            the embeddings grow to `len(tokenizer)`. None only for a shapes-only build on the meta
            device when no tokenizer is at hand (no growth, no placeholder id).
    """
    if tokenizer is None and not on_meta_device():
        raise ValueError("build_vlm needs the tokenizer (only a meta-device build may go without)")
    # a LLaVA directory (`from_hf`) gives every weight: read once, loaded into each part as it is built
    hf = read_llava_weights(model.from_hf) if model.from_hf is not None and not on_meta_device() else None
    with no_init_weights() if hf is not None else nullcontext():  # the random init would be overwritten
        vision = build_vision(model)
    llm = build_llm(model.llm, len(tokenizer) if tokenizer is not None else None, hf and (hf.path, hf.llm))
    projector = PROJECTORS.build(model.projector, vision.embed_dim, llm.config.get_text_config().hidden_size)
    if hf is not None:
        load_vision(hf, vision, projector)
    if model.mm_projector is not None and not on_meta_device():
        load_mm_projector(model.mm_projector, vision, projector)
    image_token_id = tokenizer.convert_tokens_to_ids(model.image_token) if tokenizer is not None else None
    vlm = VisionLanguageModel(vision, projector, llm, image_token_id, packed_attention=model.llm.packed_attention)
    if hf is not None:
        load_newline(hf, vlm)
    if model.compile and not on_meta_device():
        compile_blocks(vlm)
    return vlm
