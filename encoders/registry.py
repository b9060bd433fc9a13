"""The vision encoders' registry (SAM's `sam_model_registry`, timm's `@register_model`).

`build_encoder("sam_vit_b", checkpoint=...)`, `build_encoder("clip", checkpoint=<HF dir>)`,
`build_encoder("timm:vit_base_patch16_224")`. The family modules (clip.py, sam.py, timm_vit.py)
register their builders with `@ENCODERS.register(name)`; the timm family is registered once as
"timm:" and its builder's first parameter, `model_name`, is bound to what follows the prefix.
Every builder takes `checkpoint: str | None` (None = random init). Unknown names and unknown options
fail with the valid choices (`foundation.registry.Registry`).
"""

from __future__ import annotations

from typing import Any

from encoders.base import VisionEncoder
from foundation.registry import Registry

ENCODERS = Registry("encoder", prefix="timm:")


def build_encoder(name: str, **kwargs: Any) -> VisionEncoder:
    """Build a registered encoder, or `timm:<model name>`, with its builder's keyword arguments.

    Under `with torch.device("meta"):` no weights are read (see `encoders.base`).
    """
    return ENCODERS.build(name, **kwargs)
