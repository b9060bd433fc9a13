"""`AnyRes`: LLaVA-NeXT's high-resolution tiling around any `VisionEncoder` (CLIP, SAM, timm, a reduced or
enhanced tower), and LLaVA-OneVision's `anyres_max_N`.

Data flow (notation: M images, K = sum of their views, S tile side, (gh, gw) = N tokens per view, C the
tower's width, D the LLM's):

    preprocess (tiles.py)    PIL image (h, w) -> [1 + rows*cols, 3, S, S]: base view + tiles
    batch                    every image's views concatenated: pixels [K, 3, S, S], image_sizes [M, 2] (h, w)
                             or [M, 3] (h, w, foundation.views flags: a base view alone, pooled, a newline)
    forward                  [K, 3, S, S] -> [K, N, C]: the wrapped tower on every view, in one call
    projector (the VLM)      [K, N, C] -> [K, N, D]
    pack                     per image: base [N, D], then the tiles' map [rows*gh, cols*gw, D] unpadded to the
                             image's aspect ratio, resized down by `max_tiles`, a learned newline [D] after
                             each row -> [gh*gw + h'*(w'+1), D]; all images -> [L, D]

The newline lives in the LLM's input space, as in LLaVA-NeXT and transformers (`image_newline`, [D]), so the
VLM owns it (`model/vlm.py`, trained with the projector) and hands it to `pack`; this module has no
parameters of its own. The projector runs per view before packing, as theirs: the bilinear `max_tiles`
resize then mixes projected tokens, exactly as LLaVA-OneVision does.

Token counts vary per image; `num_image_tokens((h, w))` (also on the picklable `preprocess`) gives them for
the data, `--describe` and FLOP counts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from encoders.anyres.layout import TileLayout, parse_grid_pinpoints, pooled_grid, size_and_flags
from encoders.anyres.tiles import AnyResPreprocess
from encoders.base import VisionEncoder
from encoders.wrapper import EncoderWrapper
from foundation.schema import ConfigError
from foundation.views import VIEW_BASE_ONLY, VIEW_NEWLINE, VIEW_POOL


class AnyRes(EncoderWrapper):
    """Tiles an image for `encoder` and packs the projected tokens as LLaVA-NeXT: [K, 3, S, S] -> [K, N, C].

    Args:
        encoder: the wrapped tower (kept as `self.inner`); its tokens must be its whole grid (no CLS).
        grid_pinpoints: the candidate canvases: None (LLaVA-1.6's [[S, 2S], [2S, S], [2S, 2S], [3S, S],
            [S, 3S]]), a range "(1x1),...,(6x6)" (LLaVA-NeXT's; "(AxB)" = A tiles wide, B high), or a list
            of [height, width] in pixels (transformers' `image_grid_pinpoints`). See `parse_grid_pinpoints`.
        fit: "pad" (LLaVA-NeXT: keep the aspect ratio, pad, unpad the features) | "resize" (stretch).
        max_tiles: LLaVA-OneVision's `anyres_max_N` (9 in its recipes): an unpadded map above N tiles'
            worth of cells is resized (bilinear) to about that; None: never resized.
    """

    part = "tiling"  # no parameters of its own: nothing to train or freeze under this name
    uses_image_newline = True

    def __init__(
        self,
        encoder: VisionEncoder,
        grid_pinpoints: str | list[list[int]] | None = None,
        fit: Literal["pad", "resize"] = "pad",
        max_tiles: int | None = None,
    ) -> None:
        super().__init__(encoder)
        gh, gw = encoder.grid_size
        if encoder.num_tokens != gh * gw:
            raise ConfigError(
                f"model.tiling: AnyRes lays each view's tokens out on its {gh}x{gw} grid, but "
                f"{type(encoder).__name__} returns {encoder.num_tokens} tokens (a CLS token must be dropped: "
                "select_feature: patch)"
            )
        resolutions = parse_grid_pinpoints(grid_pinpoints, encoder.image_size)
        self.layout = TileLayout(resolutions, encoder.image_size, (gh, gw), fit, max_tiles)
        self.preprocess = AnyResPreprocess(self.layout, encoder.preprocess)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        return self.inner(pixels)  # [K, N, C], every view of every image in one call

    def num_image_tokens(self, image_size) -> int:
        return self.layout.num_image_tokens(tuple(image_size))  # (h, w) or (h, w, VIEW_* flags)

    def num_views(self, image_size) -> int:
        return self.layout.num_tiles(tuple(image_size))

    def pack(
        self, tokens: torch.Tensor, image_sizes: torch.Tensor | None, newline: torch.Tensor | None
    ) -> torch.Tensor:
        """Projected view tokens [K, N, D] -> the LLM's image embeddings [L, D], image after image.

        Args:
            tokens: every image's views (base first, then its tiles row-major), images in batch order.
            image_sizes: [M, 2] (height, width) of each image as preprocessing received it, or [M, 3] with the
                images' VIEW_* flags (encoders/anyres/layout.py: base view only, pooled, a newline after).
            newline: the learned row end [D] (the VLM's `image_newline`); None leaves rows unmarked.
        """
        if image_sizes is None:
            raise ValueError("AnyRes needs image_sizes [M, 2] (height, width per image) to pack its tiles")
        sizes = [size_and_flags(s) for s in image_sizes.tolist()]
        counts = [self.layout.num_tiles((*s, f)) for s, f in sizes]
        if sum(counts) != tokens.shape[0]:
            raise ValueError(
                f"{len(sizes)} image(s) of sizes {[s for s, _ in sizes]} take {sum(counts)} views ({counts}), "
                f"but {tokens.shape[0]} were encoded"
            )
        packed = []
        for views, (size, flags) in zip(tokens.split(counts), sizes):
            one = self._pack_base(views[0], flags, newline) if flags & VIEW_BASE_ONLY else None
            packed.append(one if one is not None else self._pack_one(views, size, newline))
        return torch.cat(packed)

    def _pack_base(self, base: torch.Tensor, flags: int, newline: torch.Tensor | None) -> torch.Tensor:
        """A base view alone [N, D] -> [N', D] (+ a newline): OneVision's several-image and video-frame layouts."""
        if flags & VIEW_POOL:  # OneVision's apply_pooling: bilinear to [ceil(gh/2), ceil(gw/2)]
            (gh, gw), D = self.layout.grid, base.shape[-1]
            fmap = base.reshape(gh, gw, D).permute(2, 0, 1)[None]  # [1, D, gh, gw]
            base = F.interpolate(fmap, size=pooled_grid((gh, gw)), mode="bilinear")[0].flatten(1).transpose(0, 1)
        if flags & VIEW_NEWLINE and newline is not None:
            base = torch.cat([base, newline.to(base.dtype)[None]])
        return base

    def _pack_one(self, views: torch.Tensor, size: tuple[int, int], newline: torch.Tensor | None) -> torch.Tensor:
        """One image's views [1 + rows*cols, N, D] -> [gh*gw + h'*(w'+1), D]."""
        (gh, gw), D = self.layout.grid, views.shape[-1]
        rows, cols = self.layout.tile_grid(size)
        base, tiles = views[0], views[1:]  # [N, D], [rows*cols, N, D]
        # tile (i, j) token (y, x) -> map cell (i*gh + y, j*gw + x)
        fmap = tiles.reshape(rows, cols, gh, gw, D).permute(4, 0, 2, 1, 3).reshape(D, rows * gh, cols * gw)
        top, bottom, left, right = self.layout.feature_box(size)
        fmap = fmap[:, top:bottom, left:right]  # [D, h, w]
        pooled = self.layout.pooled_size(bottom - top, right - left)
        if pooled is not None:
            fmap = F.interpolate(fmap[None], size=pooled, mode="bilinear", align_corners=False)[0]  # [D, h', w']
        if newline is not None:
            ends = newline.to(fmap.dtype).view(D, 1, 1).expand(D, fmap.shape[1], 1)
            fmap = torch.cat([fmap, ends], dim=2)  # [D, h', w' + 1]
        return torch.cat([base, fmap.flatten(1).transpose(0, 1)])  # [N + h'*(w'+1), D]
