"""Composition in one place: config -> encoder -> reducer -> enhancer -> projector -> LLM.

This is the only code that reads the experiment config; every module below takes plain keyword
arguments and can be built and tested alone (as SAM's `_build_sam` wires its parts).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from encoders import VisionEncoder, build_encoder, build_token_reducer
from encoders.checkpoint import key_mismatch_error, require_file
from lit_modules.dual_perspective import DualPerspective, load_inf_llava
from lit_modules.projector import build_projector
from lit_modules.vlm import VisionLanguageModel


def conv_reducer(encoder: VisionEncoder, channels: list[int] = (512, 1024)) -> VisionEncoder:
    """Vary / DeepSeek-VL: two stride-2 3x3 convs, e.g. SAM's 64x64x256 -> 16x16x1024."""
    return build_token_reducer(encoder, "conv", channels=tuple(channels))


def avgpool_reducer(encoder: VisionEncoder, factor: int = 4) -> VisionEncoder:
    """Average pooling by `factor` per side (width unchanged)."""
    return build_token_reducer(encoder, "avgpool", factor=factor)


REDUCERS = {"conv": conv_reducer, "avgpool": avgpool_reducer}
# INF-LLaVA's DCM + DEM around the encoder (input n*S px); options are DualPerspective's keyword arguments.
ENHANCERS = {"dual_perspective": DualPerspective}


def build_vision(cfg: DictConfig) -> VisionEncoder:
    """The vision tower of `model`: encoder, then the optional reducer, then the optional enhancer."""
    enc = OmegaConf.to_container(cfg.encoder)
    vision = build_encoder(enc.pop("name"), **enc)
    for block, registry in ((cfg.reducer, REDUCERS), (cfg.enhancer, ENHANCERS)):
        if block is not None:
            opts = OmegaConf.to_container(block)
            vision = registry[opts.pop("name")](vision, **opts)
    return vision


def build_llm(
    path: str | None = None,
    config: dict | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    vocab_size: int | None = None,
    grad_checkpointing: bool = False,
    lora: dict | None = None,
    quantization: str | None = None,
) -> PreTrainedModel:
    """Any transformers causal LM, from a directory / hub id, or randomly initialised from an inline config.

    Args:
        path: model directory or hub id.
        config: `{model_type: ..., **config kwargs}` for random init.
        dtype: weights dtype name (e.g. "bfloat16") when loading from `path`.
        attn_implementation: eager | sdpa | flash_attention_2 (None: transformers' default).
        vocab_size: grow the embeddings to at least this size (tokens added for <image> / <pad>).
        grad_checkpointing: recompute decoder layers in backward.
        lora: `{r, alpha, dropout, target_modules, modules_to_save}`: wrap with peft LoRA adapters
            (the result is a `peft.PeftModel`; see lit_modules/lora.py).
        quantization: "4bit" | "8bit": load the base through bitsandbytes for QLoRA (CUDA only; needs `lora`).
    """
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantization is not None:
        from lit_modules.lora import quantization_config, quantized_device_map

        if path is None or lora is None:
            raise ValueError("quantization (QLoRA) needs a pretrained 'path' and 'lora' adapters")
        kwargs.update(
            quantization_config=quantization_config(quantization, getattr(torch, dtype) if dtype else None),
            device_map=quantized_device_map(),
        )
    if path is not None:
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype) if dtype else None, **kwargs)
    else:
        config = dict(config)
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config), **kwargs)
    if vocab_size is not None and vocab_size > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(vocab_size)
    if grad_checkpointing:
        llm.activation_checkpointing_enable({"use_reentrant": False})
    llm.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps the mode it finds
    if lora is not None:
        from lit_modules.lora import apply_lora

        llm = apply_lora(llm, **lora, quantized=quantization is not None, grad_checkpointing=grad_checkpointing)
    return llm


def load_mm_projector(path: str, vision: VisionEncoder, projector: torch.nn.Module) -> None:
    """Load LLaVA's / INF-LLaVA's stage-1 `mm_projector.bin` (keys `[model.]mm_projector.*`, and
    `[model.]spatial_embed.*` for INF-LLaVA's DEM) into the projector and the enhancer."""
    state = torch.load(require_file(path, "mm_projector weights"), map_location="cpu", weights_only=True)
    if isinstance(vision, DualPerspective):
        rest = load_inf_llava(vision, state)
    else:
        rest = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
        others = [k for k in state if "mm_projector." not in k]
        if others:
            raise key_mismatch_error(path, [], others)
    missing, unexpected = projector.load_state_dict(rest, strict=False)
    if missing or unexpected:
        raise key_mismatch_error(
            path, [f"mm_projector.{k}" for k in missing], [f"mm_projector.{k}" for k in unexpected]
        )


def build_vlm(cfg: DictConfig, tokenizer) -> VisionLanguageModel:
    """`cfg` is the experiment's `model` section; `tokenizer` already holds the image placeholder."""
    vision = build_vision(cfg)
    llm_cfg = cfg.llm
    llm = build_llm(
        llm_cfg.path,
        OmegaConf.to_container(llm_cfg.config) if llm_cfg.config else None,
        llm_cfg.dtype,
        llm_cfg.attn_implementation,
        len(tokenizer),
        llm_cfg.grad_checkpointing,
        OmegaConf.to_container(llm_cfg.lora) if llm_cfg.get("lora") else None,
        llm_cfg.get("quantization"),
    )
    projector = build_projector(cfg.projector, vision.embed_dim, llm.config.get_text_config().hidden_size)
    if cfg.mm_projector is not None:
        load_mm_projector(cfg.mm_projector, vision, projector)
    return VisionLanguageModel(vision, projector, llm, tokenizer.convert_tokens_to_ids(cfg.image_token))
