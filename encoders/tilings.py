"""Tilings: wrappers that feed a high-resolution image to the tower as several views, by name.

`TILINGS.build("anyres", encoder, grid_pinpoints=..., max_tiles=...)` wraps `encoder` in LLaVA-NeXT's AnyRes
(encoders/anyres/). A tiling is the outermost wrapper (`model.tiling`, after the encoder, reducer and
enhancer): its views are the tower's inputs, and the number of image tokens depends on each image's size.
"""

from __future__ import annotations

from encoders.anyres import AnyRes
from foundation.registry import Registry

TILINGS = Registry("tiling", inputs=("encoder",))
TILINGS.register("anyres", AnyRes)
