"""What an experiment builds, without building it: parts, parameter counts, image tokens, sequence budget.

    python train.py experiments/llava15/sft.yaml --describe

The model comes from the composition root itself, `build_vlm`, under the meta device (shapes only:
no memory, no weights read), with the tokenizer when it is on this machine, and is frozen for the
stage with `freeze_for`: the parameter table printed here is the one a training run logs, LoRA
adapters and grown vocabularies included. A 7B recipe is described in seconds on a laptop.
"""

from __future__ import annotations

import os
import time

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from encoders import VisionEncoder, encoder_chain
from encoders.token_counts import EXAMPLE_SIZES, image_token_counts
from experiment.assemble import build_tokenizer, tokenizer_path
from foundation.schema import NAMED_BLOCKS
from model.build import build_vlm
from model.vlm import VisionLanguageModel


def build_on_meta(cfg: DictConfig, llm_config: dict | None = None) -> tuple[VisionLanguageModel, str]:
    """The experiment's model on the meta device, frozen for its stage, and its parameter table.

    Args:
        cfg: a loaded experiment config (`experiment.config.load_config`).
        llm_config: `{model_type: ..., **config kwargs}` to use instead of `model.llm` (e.g. when
            `model.llm.path` is not on this machine).
    """
    model_cfg = cfg.model
    if llm_config is not None:
        model_cfg = OmegaConf.merge(cfg.model, {"llm": {"path": None}})
        model_cfg.llm.config = llm_config
    tokenizer, _ = _tokenizer_if_here(cfg)
    with torch.device("meta"):
        model = build_vlm(model_cfg, tokenizer)
    return model, model.freeze_for(cfg.stage, cfg.trainable)


def describe(cfg: DictConfig, llm_config: dict | None = None, image_sizes: list[tuple[int, int]] | None = None) -> str:
    """Each part's parameters (total, trainable in this stage), where its weights come from, and what the
    LLM sees of an image (input size, image tokens, text budget within data.max_length). Arguments as
    `build_on_meta`; `image_sizes` (height, width): the images whose token counts to show (by default
    encoders/token_counts.py's `EXAMPLE_SIZES` where the count depends on the size)."""
    start = time.perf_counter()
    model, table = build_on_meta(cfg, llm_config)
    seconds = time.perf_counter() - start
    vision, text = model.vision, model.llm.config.get_text_config()
    lines = [
        f"{cfg.name}: built on the meta device in {seconds:.1f} s (shapes only, no weights read)",
        *table.splitlines(),
        "",
        "weights:",
        *(f"  {part:<10}{source}" for part, source in _sources(cfg, text).items() if part in model.parts()),
        "",
        "vision: " + _vision_chain(vision),
    ]
    if cfg.model.from_hf is not None:  # the model section the directory gave, as the run adjusted it
        section = yaml.safe_dump({"model": _set(OmegaConf.to_container(cfg.model, resolve=True))},
                                 default_flow_style=None, sort_keys=False, width=116)  # fmt: skip
        lines[-1:-1] = [f"model.from_hf: {cfg.model.from_hf} gives (with this run's overrides):",
                        *("  " + line for line in section.splitlines()), ""]  # fmt: skip
    tokens, max_length = vision.num_tokens, cfg.data.max_length
    per_view = (
        f"{tokens} ({vision.grid_size[0]} x {vision.grid_size[1]}"
        f"{' + CLS' if tokens != vision.grid_size[0] * vision.grid_size[1] else ''}) of width "
        f"{vision.embed_dim}, projected to {text.hidden_size}"
    )
    sizes = [tuple(s) for s in image_sizes or ()]
    shown = image_token_counts(vision, sizes or EXAMPLE_SIZES)  # encoders/token_counts.py, as HPARAMS reports
    varies = image_token_counts(vision, (*sizes, *EXAMPLE_SIZES)).varies
    if not varies:
        lines.append(f"image tokens per image: {per_view}")
    else:  # a tiling: the count depends on the image's size
        lines.append(f"image tokens per encoder view: {per_view}; per image by its size (height x width):")
        for (h, w), n, views in zip(shown.sizes, shown.tokens, shown.views):
            lines.append(f"  {h} x {w} px: {n} image tokens ({views} encoder views)")
        tokens = max(shown.tokens)
    budget = max_length - tokens
    lines.append(
        f"sequence: data.max_length {max_length} = {tokens} image tokens + {budget} text tokens "
        f"(one image per sample{', the largest above' if varies else ''})"
        + ("  <- no room for text" if budget <= 0 else "")
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
    embeddings = model.llm.get_input_embeddings().num_embeddings
    if model.image_token_id is None:  # built without a tokenizer: say why, and what it would change
        _, missing = _tokenizer_if_here(cfg)
        lines.append(f"vocabulary: {embeddings:,} embeddings (no tokenizer: {missing}; the tokens it adds,")
        lines.append(f"  such as {cfg.model.image_token}, grow it)")
    else:
        lines.append(f"vocabulary: {embeddings:,} embeddings")
    if cfg.model.llm.quantization is not None:
        lines.append(f"LLM counted unquantized (model.llm.quantization={cfg.model.llm.quantization} packs it on load)")
    return "\n".join(lines)


def _set(node):
    """A config mapping without its unset (null) keys, at every depth."""
    if isinstance(node, dict):
        return {k: _set(v) for k, v in node.items() if v is not None}
    return node


def _tokenizer_if_here(cfg: DictConfig):
    """(the tokenizer, None) when it loads from this machine, else (None, why not)."""
    try:
        path = tokenizer_path(cfg)
    except ValueError as err:
        return None, str(err)
    if not os.path.isdir(os.path.expanduser(path)):
        return None, f"tokenizer {path} not on this machine"
    try:
        return build_tokenizer(cfg), None
    except (OSError, ValueError) as err:
        return None, f"tokenizer {path} does not load ({type(err).__name__})"


def _where(path: str) -> str:
    return path if os.path.exists(os.path.expanduser(path)) else f"{path} (not on this machine)"


def _sources(cfg: DictConfig, text) -> dict[str, str]:
    m = cfg.model
    if m.from_hf is not None:  # one source for every weight
        sources = {kind: f"{m[kind].name}: {_where(m.from_hf)}" for kind in NAMED_BLOCKS if m[kind] is not None}
        sources["projector"] = f"{m.projector}: {_where(m.from_hf)}"
        if m.llm.lora is not None:
            return {**sources, "llm": "LoRA adapters: random init", "llm_base": f"{text.model_type}: {m.from_hf}"}
        return {**sources, "llm": f"{text.model_type}: {_where(m.from_hf)}"}
    ckpt = m.encoder.get("checkpoint")
    projector_source = _where(m.mm_projector) if m.mm_projector else "random init"
    # the enhancer's weights come with the projector's (INF-LLaVA's mm_projector.bin holds both)
    encoder_source = _where(ckpt) if ckpt else "random init"
    # a tiling has no weights; its learned newline is the VLM's and comes with the projector's
    weights = {"encoder": encoder_source, "reducer": "random init", "enhancer": projector_source}
    weights["tiling"] = "no weights"
    sources = {kind: f"{m[kind].name}: {weights[kind]}" for kind in NAMED_BLOCKS if m[kind] is not None}
    sources["projector"] = f"{m.projector}: {projector_source}"
    llm = f"{text.model_type}: " + (_where(m.llm.path) if m.llm.path else "random init (inline config)")
    if m.llm.lora is not None:
        sources["llm"] = "LoRA adapters: random init"
        sources["llm_base"] = llm
    else:
        sources["llm"] = llm
    return sources


def _vision_chain(vision: VisionEncoder) -> str:
    """Outermost wrapper first, e.g. `1008 x 1008 px images -> DualPerspective (...) wrapping CLIPEncoder (...)`."""
    chain = [
        f"{type(m).__name__} ({m.image_size} px in, {m.grid_size[0]} x {m.grid_size[1]} x {m.embed_dim} out)"
        for m in encoder_chain(vision)
    ]
    side = f"{vision.image_size} x {vision.image_size} px"
    tiled = image_token_counts(vision).tiled
    return (f"images of any size as {side} views" if tiled else f"{side} images") + " -> " + " wrapping ".join(chain)
