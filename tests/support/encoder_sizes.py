"""Every registered encoder at full size: its shape and parameter count, written out by hand (independent of
the code under test), for builds on the meta device."""

from __future__ import annotations


def vit_params(width: int, mlp: int, blocks: int, patch: int, side: int, patch_bias: bool) -> int:
    """Pre-norm ViT with a CLS token and learned position embeddings, no final norm, no head."""
    tokens = (side // patch) ** 2 + 1
    embed = 3 * patch * patch * width + (width if patch_bias else 0) + width + tokens * width  # patch, cls, pos
    block = 4 * (width * width + width) + 2 * 2 * width + (width * mlp + mlp) + (mlp * width + width)
    return embed + blocks * block


# registry name -> (name, kwargs, (image_size, grid, embed_dim, parameters)) at full size, built on the meta
# device (no memory, no init). Parameter counts are written out by hand: layers after the selected one are
# pruned (CLIP-L keeps 23 of 24 layers, 290.9M of its 303.5M; ViT-B keeps 11 of 12 blocks).
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
FULL_SIZE = {
    # pre_layrnorm (2 * 1024) on top of the ViT; the patch conv has no bias
    "clip": (
        "clip",
        {"config": dict(CLIP_L, image_size=336)},
        (336, (24, 24), 1024, vit_params(1024, 4096, 23, 14, 336, False) + 2048),
    ),
    "clip_vit_l_336": ("clip_vit_l_336", {}, (336, (24, 24), 1024, 290_909_184)),
    "clip_vit_l_224": ("clip_vit_l_224", {}, (224, (16, 16), 1024, 290_581_504)),
    "sam_vit_b": ("sam_vit_b", {}, (1024, (64, 64), 256, 89_670_912)),  # official ImageEncoderViT count
    "timm:": ("timm:vit_base_patch16_224", {}, (224, (14, 14), 768, vit_params(768, 3072, 11, 16, 224, True))),
}
