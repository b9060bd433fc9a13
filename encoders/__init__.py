"""Vision encoders behind one contract (`encoders.base.VisionEncoder`), found by name."""

# Importing a family module registers its builders.
from encoders import clip, sam, timm_vit  # noqa: E402,F401
from encoders.base import VisionEncoder, split_parts
from encoders.registry import build_encoder, encoder_options, list_encoders, register_encoder
from encoders.token_reducer import TokenReducer, build_token_reducer

__all__ = [
    "TokenReducer",
    "VisionEncoder",
    "build_encoder",
    "build_token_reducer",
    "encoder_options",
    "list_encoders",
    "register_encoder",
    "split_parts",
]
