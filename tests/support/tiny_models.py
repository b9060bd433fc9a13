"""The tiny test models, each defined once as the keyword arguments of its constructor; the YAML overrides
that put them in an experiment are derived from the same dicts, so the two cannot drift."""

from __future__ import annotations

# A 3-layer transformers CLIP vision tower (32 px, 4 x 4 patches of 8 px): `CLIPVisionConfig(**TINY_CLIP)`,
# or the project's `clip` encoder built from config (the tower the export tests need).
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)

# `model_kwargs` of the timm ViT (`timm:vit_tiny_patch16_224`) at 32 px: 3 blocks, 4 x 4 patches of 8 px.
TINY_VIT_IMAGE_SIZE = 32
TINY_VIT = dict(patch_size=8, depth=3, embed_dim=32, num_heads=2)

# A 2-layer Llama: `LlamaConfig(**TINY_LLAMA)`; the experiment's inline `model.llm.config` adds its model_type.
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=128,
)

# A small SAM-shaped encoder (`SamImageEncoder(**TINY_SAM)`): 128 px, 8 x 8 grid, 4 x 4 windows, block 1 global.
TINY_SAM = dict(
    image_size=128,
    patch_size=16,
    width=32,
    depth=2,
    num_heads=2,
    window_size=4,
    global_attn_indexes=(1,),
    out_chans=16,
)


def flow(mapping: dict) -> str:
    """A flat mapping as a YAML flow mapping for a `key=value` override: {a: 1, b: 2}."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def llama_yaml(**changes) -> str:
    """TINY_LLAMA (with `changes`) as the inline `model.llm.config` of an experiment."""
    return flow({"model_type": "llama", **TINY_LLAMA, **changes})


TINY_LLAMA_YAML = llama_yaml()
# Overrides putting the tiny models in the (quickstart) experiment
TINY_CLIP_ENCODER = f"model.encoder={{name: clip, config: {flow(TINY_CLIP)}}}"
TINY_VIT_ENCODER = (f"model.encoder.image_size={TINY_VIT_IMAGE_SIZE}", f"model.encoder.model_kwargs={flow(TINY_VIT)}")
TINY_LLM = f"model.llm.config={TINY_LLAMA_YAML}"
