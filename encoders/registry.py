"""Name -> builder registry for vision encoders (SAM's `sam_model_registry`, timm's `@register_model`).

`build_encoder("sam_vit_b", checkpoint=...)`, `build_encoder("clip", checkpoint=<HF dir>)`,
`build_encoder("timm:vit_base_patch16_224")`. Every builder takes `checkpoint: str | None`
(None = random init). Unknown names and unknown keyword arguments fail with the valid choices.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from encoders.base import VisionEncoder

_BUILDERS: dict[str, Callable[..., VisionEncoder]] = {}
TIMM_PREFIX = "timm:"


def register_encoder(name: str) -> Callable:
    def decorator(fn: Callable[..., VisionEncoder]) -> Callable[..., VisionEncoder]:
        if name in _BUILDERS:
            raise ValueError(f"encoder {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return decorator


def list_encoders() -> list[str]:
    """Registered names; any `timm:<model name>` is accepted on top of these."""
    return sorted(_BUILDERS) + [TIMM_PREFIX + "<timm model name>"]


def get_builder(name: str) -> Callable[..., VisionEncoder]:
    if name.startswith(TIMM_PREFIX):
        return _BUILDERS["timm"]
    if name not in _BUILDERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}")
    return _BUILDERS[name]


def encoder_options(name: str) -> list[str]:
    """Keyword arguments the builder of `name` accepts (what a YAML `model.encoder` may set)."""
    params = inspect.signature(get_builder(name)).parameters
    return [p for p in params if p != "model_name"]


def build_encoder(name: str, **kwargs: Any) -> VisionEncoder:
    """Build a registered encoder, or `timm:<model name>`, with the builder's keyword arguments."""
    builder = get_builder(name)
    valid = encoder_options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"encoder {name!r} got unknown option(s) {unknown}; valid options: {valid}")
    if name.startswith(TIMM_PREFIX):
        return builder(model_name=name[len(TIMM_PREFIX) :], **kwargs)
    return builder(**kwargs)
