"""What an experiment builds, without building it: parts, parameter counts, image tokens, sequence budget.

    python train.py experiments/llava15/sft.yaml --describe

The model is built on the meta device (shapes only: no memory, no weights read), so a 7B recipe is
described in seconds on a laptop. Encoders are built without their checkpoint (an encoder family that
reads its architecture from the checkpoint, `clip`, gets it from the checkpoint's config.json); the
LLM comes from `model.llm.config`, or from the config.json of `model.llm.path` where that is on disk.
"""

from __future__ import annotations

import os
import time

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from config import PARTS
from encoders import VisionEncoder, encoder_options
from lit_modules.build import build_vision
from lit_modules.projector import build_projector
from lit_modules.vlm import VisionLanguageModel
from lit_modules.vlm_module import STAGE_TRAINABLE


def build_on_meta(cfg: DictConfig, llm_config: dict | None = None) -> VisionLanguageModel:
    """The experiment's model on the meta device: every part's shapes, no weights, no memory.

    Args:
        cfg: a loaded experiment config (`config.load_config`).
        llm_config: `{model_type: ..., **config kwargs}` to use instead of `model.llm` (e.g. when
            `model.llm.path` is not on this machine).
    """
    m = cfg.model
    encoder_cfg = _encoder_without_weights(OmegaConf.to_container(m.encoder))
    llm_conf = _llm_config(m.llm, llm_config)
    with torch.device("meta"):
        vision = build_vision(OmegaConf.create({"encoder": encoder_cfg, "reducer": m.reducer, "enhancer": m.enhancer}))
        llm = AutoModelForCausalLM.from_config(llm_conf)
        projector = build_projector(m.projector, vision.embed_dim, llm.config.get_text_config().hidden_size)
    return VisionLanguageModel(vision, projector, llm, image_token_id=-1)


def describe(cfg: DictConfig, llm_config: dict | None = None) -> str:
    """Each part's parameters (total, trainable in this stage), where its weights come from, and what the
    LLM sees of an image (input size, image tokens, text budget within data.max_length). Arguments as
    `build_on_meta`."""
    start = time.perf_counter()
    model = build_on_meta(cfg, llm_config)
    seconds = time.perf_counter() - start
    m, vision = cfg.model, model.vision
    text = model.llm.config.get_text_config()

    parts = model.parts()
    trainable = tuple(cfg.trainable) if cfg.trainable is not None else STAGE_TRAINABLE[cfg.stage]
    why = "`trainable`" if cfg.trainable is not None else "the stage's default"
    lines = [
        f"{cfg.name}: stage {cfg.stage!r}, training {', '.join(p for p in trainable if p in parts)} ({why})",
        f"built on the meta device in {seconds:.1f} s (shapes only, no weights read)",
        "",
    ]

    sources = _sources(cfg, text)
    rows = [(part, sum(p.numel() for _, p in parts[part]), part in trainable) for part in PARTS if part in parts]
    total = sum(n for _, n, _ in rows)
    lines.append(f"{'part':<10}{'parameters':>16}{'trainable':>16}   weights")
    for part, n, trains in rows:
        lines.append(f"{part:<10}{n:>16,}{n if trains else 0:>16,}   {sources.get(part, '')}")
    lines.append(f"{'total':<10}{total:>16,}{sum(n for _, n, t in rows if t):>16,}")
    lines.append("")

    lines.append("vision: " + _vision_chain(vision))
    tokens, max_length = vision.num_tokens, cfg.data.max_length
    lines.append(
        f"image tokens per image: {tokens} ({vision.grid_size[0]} x {vision.grid_size[1]}"
        f"{' + CLS' if tokens != vision.grid_size[0] * vision.grid_size[1] else ''}) of width "
        f"{vision.embed_dim}, projected to {text.hidden_size}"
    )
    budget = max_length - tokens
    lines.append(
        f"sequence: data.max_length {max_length} = {tokens} image tokens + {budget} text tokens "
        f"(one image per sample)" + ("  <- no room for text" if budget <= 0 else "")
    )
    positions = getattr(text, "max_position_embeddings", None)
    if positions is not None:
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        lines.append(
            f"LLM: {text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
            f"{heads} heads ({kv} key/value), {positions} positions"
            + ("  <- shorter than data.max_length" if positions < max_length else "")
        )
    lines.append(
        f"vocabulary: {text.vocab_size:,} (the LLM config's; tokens the tokenizer adds, such as "
        f"{m.image_token}, grow it)"
    )
    return "\n".join(lines)


def _encoder_without_weights(enc: dict) -> dict:
    """The encoder block with its weights left out; its architecture must not change."""
    enc = dict(enc)
    options = encoder_options(enc["name"])
    checkpoint = enc.pop("checkpoint", None)
    if "pretrained" in enc:
        enc["pretrained"] = False
    if checkpoint is not None and "config" in options and enc.get("config") is None:
        # a family such as `clip` reads its architecture from the checkpoint directory
        enc["config"] = _architecture_from(checkpoint, enc["name"])
    return enc


def _architecture_from(checkpoint: str, name: str) -> dict:
    if not os.path.exists(os.path.join(os.path.expanduser(checkpoint), "config.json")):
        raise ValueError(
            f"encoder {name!r} takes its architecture from {checkpoint}/config.json, which is not "
            f"here; describe with a named variant (e.g. model.encoder.name=clip_vit_l_336) or an "
            f"inline model.encoder.config={{...}}"
        )
    conf = AutoConfig.from_pretrained(checkpoint)
    conf = getattr(conf, "vision_config", None) or conf  # a whole CLIP directory holds the text tower too
    return {
        k: v
        for k, v in conf.to_dict().items()
        if not k.startswith("_") and k not in ("transformers_version", "architectures")
    }


def _llm_config(llm: DictConfig, override: dict | None) -> PretrainedConfig:
    inline = override if override is not None else (OmegaConf.to_container(llm.config) if llm.config else None)
    if inline is not None:
        inline = dict(inline)
        return AutoConfig.for_model(inline.pop("model_type"), **inline)
    try:  # a local directory, or a hub id already in the local cache; never the network
        return AutoConfig.from_pretrained(llm.path, local_files_only=True)
    except (OSError, ValueError):
        raise ValueError(
            f"describe needs the LLM's architecture, but {llm.path!r} has no config.json on this machine. Copy "
            f"the model's config.json (not its weights) there, or pass it inline, e.g. for Vicuna-7B: "
            f"model.llm.path=null 'model.llm.config={{model_type: llama, hidden_size: 4096, "
            f"intermediate_size: 11008, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 32, "
            f"vocab_size: 32000, max_position_embeddings: 4096}}'"
        ) from None


def _where(path: str) -> str:
    return path if os.path.exists(os.path.expanduser(path)) else f"{path} (not on this machine)"


def _sources(cfg: DictConfig, text: PretrainedConfig) -> dict[str, str]:
    m = cfg.model
    enc = m.encoder
    ckpt = enc.get("checkpoint")
    sources = {"encoder": f"{enc.name}: " + (_where(ckpt) if ckpt else "random init")}
    if m.reducer is not None:
        sources["reducer"] = f"{m.reducer.name}: random init"
    if m.enhancer is not None:
        sources["enhancer"] = f"{m.enhancer.name}: " + (_where(m.mm_projector) if m.mm_projector else "random init")
    sources["projector"] = f"{m.projector}: " + (_where(m.mm_projector) if m.mm_projector else "random init")
    sources["llm"] = f"{text.model_type}: " + (_where(m.llm.path) if m.llm.path else "random init (inline config)")
    return sources


def _vision_chain(vision: VisionEncoder) -> str:
    """Outermost wrapper first, e.g. `1008 x 1008 px images -> DualPerspective (...) wrapping CLIPEncoder (...)`."""
    chain, module = [], vision
    while module is not None:
        chain.append(
            f"{type(module).__name__} ({module.image_size} px in, {module.grid_size[0]} x "
            f"{module.grid_size[1]} x {module.embed_dim} out)"
        )
        module = getattr(module, "inner", None)
    return f"{vision.image_size} x {vision.image_size} px images -> " + " wrapping ".join(chain)
