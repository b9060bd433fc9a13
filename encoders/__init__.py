"""Vision encoders behind one contract (`encoders.base.VisionEncoder`), found by name in `ENCODERS`, and the
wrappers around them (`EncoderWrapper`): token reducers (`REDUCERS`) and enhancers (`ENHANCERS`: INF-LLaVA's
dual-perspective module in inf_llava/)."""

# Importing a family module registers its builders.
from encoders import clip, sam, timm_vit  # noqa: F401
from encoders.base import VisionEncoder
from encoders.enhancers import ENHANCERS
from encoders.registry import ENCODERS, build_encoder
from encoders.token_reducer import REDUCERS
from encoders.wrapper import EncoderWrapper, encoder_chain, split_parts

__all__ = [
    "ENCODERS",
    "ENHANCERS",
    "REDUCERS",
    "EncoderWrapper",
    "VisionEncoder",
    "build_encoder",
    "encoder_chain",
    "split_parts",
]
