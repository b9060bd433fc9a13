"""Enhancers: wrappers that rework an encoder's tokens before the projector (part "enhancer"), by name.

`ENHANCERS.build("dual_perspective", encoder, n=3, ...)` wraps `encoder` in INF-LLaVA's
dual-perspective module; a builder's first argument is the wrapped encoder, passed by the caller,
and its other keyword arguments are the options a config block may set.
"""

from __future__ import annotations

from encoders.inf_llava import DualPerspective
from foundation.registry import Registry

ENHANCERS = Registry("enhancer", inputs=("encoder",))
ENHANCERS.register("dual_perspective", DualPerspective)
