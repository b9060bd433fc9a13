"""Vision encoders behind one contract (`encoders.base.VisionEncoder`), found by name in `ENCODERS`, and the
wrappers around them (`EncoderWrapper`): token reducers (`REDUCERS`), enhancers (`ENHANCERS`: INF-LLaVA's
dual-perspective module in inf_llava/) and tilings (`TILINGS`: LLaVA-NeXT's AnyRes in anyres/)."""

# Importing a family module registers its builders.
from encoders import clip, sam, timm_vit  # noqa: F401
from encoders.base import VisionEncoder
from encoders.enhancers import ENHANCERS
from encoders.registry import ENCODERS, build_encoder
from encoders.tilings import TILINGS
from encoders.token_reducer import REDUCERS
from encoders.wrapper import EncoderWrapper, encoder_chain, split_parts

# The registry of each named config block (foundation.schema.NAMED_BLOCKS), by its kind.
BLOCK_REGISTRIES = {registry.kind: registry for registry in (ENCODERS, REDUCERS, ENHANCERS, TILINGS)}

__all__ = [
    "BLOCK_REGISTRIES",
    "ENCODERS",
    "ENHANCERS",
    "REDUCERS",
    "TILINGS",
    "EncoderWrapper",
    "VisionEncoder",
    "build_encoder",
    "encoder_chain",
    "split_parts",
]
