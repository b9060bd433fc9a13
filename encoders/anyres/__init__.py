"""LLaVA-NeXT's AnyRes (and LLaVA-OneVision's `anyres_max_N`) as a tiling wrapper around any encoder.

Files: `layout.py` (the geometry: canvases, best resolution, unpadding, token counts), `tiles.py` (an image
-> base view + tiles, normalised), `anyres.py` (`AnyRes`, the wrapper: encodes the views, packs the projected
tokens with the learned newline).
"""

from encoders.anyres.anyres import AnyRes
from encoders.anyres.layout import (
    FITS,
    TileLayout,
    fitted_size,
    parse_grid_pinpoints,
    select_best_resolution,
    unpadded_box,
)
from encoders.anyres.tiles import AnyResPreprocess

__all__ = [
    "FITS",
    "AnyRes",
    "AnyResPreprocess",
    "TileLayout",
    "fitted_size",
    "parse_grid_pinpoints",
    "select_best_resolution",
    "unpadded_box",
]
