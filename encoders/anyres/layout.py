"""AnyRes geometry: which grid of tiles an image gets, which feature cells survive unpadding, and how many
tokens the LLM sees. Pure arithmetic on sizes, all in (height, width) order; a picklable `TileLayout` holds it
so DataLoader workers count an image's tokens without the model.

Restated from LLaVA-NeXT (github.com/LLaVA-VL/LLaVA-NeXT, llava/mm_utils.py and llava/model/llava_arch.py)
and checked against transformers' `LlavaNextImageProcessor` / `LlavaNextForConditionalGeneration` /
`LlavaOnevisionForConditionalGeneration`, which tests/test_anyres.py compares with:

- resolutions ("grid pinpoints"): the image is fitted to one of these canvases, each a whole number of tiles;
- best resolution: the canvas that keeps most of the image's pixels once it is scaled to fit inside
  (downscaled sides truncated to ints, never more than the original area), ties broken by the least unused
  canvas area, the first in list order winning a full tie;
- fit "pad": scale to fit (the filled side exact, the other `ceil`ed and capped), centre on a black canvas;
- unpad: the feature map of the canvas [rows*gh, cols*gw] is cut back to the image's aspect ratio (what the
  padding covered is dropped, rounding as transformers: `int(round(side * scale, 7))`, then the padding
  split evenly, an odd cell staying);
- `max_tiles` (LLaVA-OneVision's `anyres_max_N`): an unpadded map of more than N tiles' worth of cells
  (by a factor over 1.1 per side) is resized bilinearly to [int(h // r), int(w // r)],
  r = sqrt(h * w / (N * gh * gw));
- tokens per image: the base view's gh*gw, then the (unpadded, resized) map row by row with one learned
  newline after each row.

Views per image (`foundation.views` VIEW_* flags, the third column of a batch's `image_sizes` [M, 3]; 0 or
no column: tiled).
LLaVA-OneVision (transformers' `LlavaOnevisionModel.get_image_features` with `batch_num_images`, and its
processor) takes an image of a sample with several images at its base view only, followed by one newline:
gh*gw + 1 tokens. A video frame is a base view too; OneVision's `apply_pooling` resizes its [gh, gw] map
bilinearly to [ceil(gh / 2), ceil(gw / 2)] (27 x 27 -> 14 x 14 = 196 at 384 px) and puts one newline after the
whole video, i.e. after its last frame.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from foundation.schema import ConfigError
from foundation.views import VIEW_BASE_ONLY, VIEW_NEWLINE, VIEW_POOL

FITS = ("pad", "resize")
# LLaVA-1.6's canvases in tiles as (rows, cols): transformers' default image_grid_pinpoints
# [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] for 336 px tiles.
LLAVA_1_6 = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
KEY = "model.tiling.grid_pinpoints"


def size_and_flags(size) -> tuple[tuple[int, int], int]:
    """A row of `image_sizes`: (height, width) or (height, width, VIEW_* flags) -> ((height, width), flags)."""
    size = tuple(int(v) for v in size)
    return size[:2], (size[2] if len(size) > 2 else 0)


def pooled_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """OneVision's 2x2 pooling of a [gh, gw] map: [ceil(gh / 2), ceil(gw / 2)]."""
    return math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)


def parse_grid_pinpoints(spec: str | list | tuple | None, tile: int) -> tuple[tuple[int, int], ...]:
    """The candidate canvases [(height, width), ...] in pixels.

    Args:
        spec: None (LLaVA-1.6's five canvases at `tile`); a range "(1x1),...,(3x3)" as LLaVA-NeXT writes it,
            "(AxB)" being A tiles wide by B high, every (a, b) between the first and the last, widths in the
            outer loop as LLaVA-NeXT lists them; or an explicit list of [height, width] in pixels (transformers'
            `image_grid_pinpoints`), each a multiple of `tile`.
        tile: the tile side in pixels (the wrapped encoder's input side).

    Raises:
        ConfigError: a malformed range or a canvas that is not a whole number of tiles.
    """
    if spec is None:
        return tuple((r * tile, c * tile) for r, c in LLAVA_1_6)
    if isinstance(spec, str):
        pairs = re.findall(r"\((\d+)x(\d+)\)", spec)
        if not pairs or re.sub(r"\(\d+x\d+\)|[\s,.]", "", spec):
            raise ConfigError(f"'{KEY}' = {spec!r} is not a range like '(1x1),...,(3x3)' or a list of [height, width]")
        (w0, h0), (w1, h1) = (tuple(map(int, p)) for p in (pairs[0], pairs[-1]))
        if not (1 <= w0 <= w1 and 1 <= h0 <= h1):
            raise ConfigError(f"'{KEY}' = {spec!r}: the range must run from a smaller to a larger grid, from 1x1 up")
        return tuple((b * tile, a * tile) for a in range(w0, w1 + 1) for b in range(h0, h1 + 1))
    out = []
    for pair in spec:
        if len(pair) != 2 or any(int(v) != v or v < tile or v % tile for v in pair):
            raise ConfigError(f"'{KEY}': {list(pair)} is not [height, width] in whole {tile} px tiles")
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise ConfigError(f"'{KEY}' is an empty list")
    return tuple(out)


def select_best_resolution(size: tuple[int, int], resolutions: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The canvas (height, width) keeping most pixels of an image of `size` (height, width), then wasting least."""
    h, w = size
    best, best_kept, best_waste = None, 0, math.inf
    for ch, cw in resolutions:
        scale = min(cw / w, ch / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = ch * cw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ch, cw), kept, waste
    return best


def fitted_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of `size` scaled to fit inside `canvas`: one side fills it, the other is
    `ceil`ed and capped at the canvas."""
    h, w = size
    ch, cw = canvas
    if cw / w < ch / h:
        return min(math.ceil(h * cw / w), ch), cw
    return ch, min(math.ceil(w * ch / h), cw)


def unpadded_box(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the cells of a [grid_h, grid_w] feature map of the padded canvas that an
    image of `size` (height, width) covers: the padding's share is cut evenly from both ends."""
    h, w = size
    gh, gw = grid
    if w / h > gw / gh:  # wider than the map: padding above and below
        kept = int(round(h * (gw / w), 7))
        pad = (gh - kept) // 2
        return pad, gh - pad, 0, gw
    kept = int(round(w * (gh / h), 7))
    pad = (gw - kept) // 2
    return 0, gh, pad, gw - pad


@dataclass(frozen=True)
class TileLayout:
    """The geometry of AnyRes for one wrapped encoder (picklable, no tensors).

    Attributes:
        resolutions: candidate canvases (height, width) in pixels, whole tiles each.
        tile: tile side S in pixels (the wrapped encoder's input side).
        grid: the encoder's token grid (gh, gw) per tile.
        fit: "pad" (LLaVA-NeXT: keep the aspect ratio, pad black, unpad the features) | "resize" (stretch
            to the canvas; nothing to unpad).
        max_tiles: LLaVA-OneVision's `anyres_max_N`: resize a larger unpadded map down to about N tiles'
            worth of cells; None: never.
    """

    resolutions: tuple[tuple[int, int], ...]
    tile: int
    grid: tuple[int, int]
    fit: str = "pad"
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ConfigError(f"'model.tiling.fit' = {self.fit!r} is not valid; choose one of: {', '.join(FITS)}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"'model.tiling.max_tiles' = {self.max_tiles!r} is not valid; it must be >= 1 or null")

    def canvas(self, size: tuple[int, int]) -> tuple[int, int]:
        """The best canvas (height, width) for an image of `size` (height, width)."""
        return select_best_resolution(size, self.resolutions)

    def tile_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of `size`."""
        ch, cw = self.canvas(size)
        return ch // self.tile, cw // self.tile

    def num_tiles(self, size) -> int:
        """Encoder images per input image: the base view and rows * cols tiles, or 1 (`VIEW_BASE_ONLY`).
        `size`: (height, width), or (height, width, VIEW_* flags) as a row of `image_sizes`."""
        size, flags = size_and_flags(size)
        if flags & VIEW_BASE_ONLY:
            return 1
        rows, cols = self.tile_grid(size)
        return 1 + rows * cols

    def feature_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the kept cells of the [rows*gh, cols*gw] feature map."""
        rows, cols = self.tile_grid(size)
        full = (rows * self.grid[0], cols * self.grid[1])
        return unpadded_box(size, full) if self.fit == "pad" else (0, full[0], 0, full[1])

    def pooled_size(self, height: int, width: int) -> tuple[int, int] | None:
        """`max_tiles`' target (h', w') for an unpadded map of height x width cells, or None to keep it."""
        if self.max_tiles is None:
            return None
        ratio = math.sqrt(height * width / (self.max_tiles * self.grid[0] * self.grid[1]))
        if ratio <= 1.1:  # LLaVA-OneVision's margin: a map only slightly over the budget stays as it is
            return None
        return int(height // ratio), int(width // ratio)

    def map_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) cells of the tiles' map that reach the LLM (after unpadding and `max_tiles`)."""
        top, bottom, left, right = self.feature_box(size)
        h, w = bottom - top, right - left
        return self.pooled_size(h, w) or (h, w)

    def num_image_tokens(self, size) -> int:
        """Tokens the LLM sees for an image of `size` (height, width): base view, map rows, a newline per row;
        with (height, width, flags) and `VIEW_BASE_ONLY`: the base view (pooled with `VIEW_POOL`) and a newline
        with `VIEW_NEWLINE`."""
        size, flags = size_and_flags(size)
        if flags & VIEW_BASE_ONLY:
            gh, gw = pooled_grid(self.grid) if flags & VIEW_POOL else self.grid
            return gh * gw + int(bool(flags & VIEW_NEWLINE))
        h, w = self.map_size(size)
        return self.grid[0] * self.grid[1] + h * (w + 1)
