"""AnyRes preprocessing: one PIL image -> the base view and its tiles, [1 + rows*cols, 3, S, S], normalised.

As LLaVA-NeXT's `process_anyres_image` and transformers' `LlavaNextImageProcessor` (PIL backend) compute it:
1. the best canvas for the image's size (`TileLayout.canvas`);
2. fit "pad": resize to `fitted_size` (PIL bicubic), paste centred on a black canvas, the offset
   ((canvas - size) // 2) rounded down, as transformers' `_pad_for_patching` and LLaVA-NeXT's paste;
   fit "resize": stretch to the canvas;
3. cut the canvas into S x S tiles, row-major;
4. the base view: the whole image stretched to S x S (bicubic), not padded: LLaVA-NeXT's own comment calls
   it a bug kept for compatibility, and every released checkpoint trained with it;
5. every view through the wrapped encoder's own recipe (`inner.preprocess`): for CLIP a shortest-edge resize
   and centre crop that leave an S x S view as it is, then rescale and normalise. LLaVA-NeXT runs each tile
   through the CLIP processor the same way; a SAM or timm tower gets its own recipe per tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from encoders.anyres.layout import TileLayout, fitted_size

# LLaVA-NeXT resizes with PIL's default (bicubic); transformers' LlavaNextImageProcessor has resample=BICUBIC.
RESAMPLE = Image.Resampling.BICUBIC
PAD_COLOUR = (0, 0, 0)  # LLaVA-NeXT's `resize_and_pad_image` and transformers' zero padding (before normalising)


@dataclass(frozen=True)
class AnyResPreprocess:
    """PIL RGB image -> normalised [1 + rows*cols, 3, S, S]: the base view, then the tiles row-major.

    Picklable (DataLoader workers copy it) and without tensors, like the encoders' own recipes.

    Args:
        layout: the tiling geometry.
        tile_preprocess: the wrapped encoder's recipe, PIL S x S view -> [3, S, S].
    """

    layout: TileLayout
    tile_preprocess: Callable[[Image.Image], torch.Tensor]

    @property
    def image_size(self) -> int:
        return self.layout.tile

    @property
    def pixel_mean(self) -> Any:
        return self.tile_preprocess.pixel_mean

    @property
    def pixel_std(self) -> Any:
        return self.tile_preprocess.pixel_std

    def num_tiles(self, size) -> int:
        """Views for an image of `size` (height, width): what `__call__` returns along dim 0 (with VIEW_* flags
        as a third element: 1 for a base view alone, what `base_view` returns)."""
        return self.layout.num_tiles(size)

    def num_image_tokens(self, size) -> int:
        """Tokens the LLM sees for an image of `size` (height, width[, flags]); see `TileLayout.num_image_tokens`."""
        return self.layout.num_image_tokens(size)

    def canvas_image(self, img: Image.Image) -> Image.Image:
        """The image fitted to its best canvas (steps 1-2 of the module docstring)."""
        size = (img.height, img.width)
        ch, cw = self.layout.canvas(size)
        if self.layout.fit == "resize":
            return img.resize((cw, ch), resample=RESAMPLE, reducing_gap=None)
        h, w = fitted_size(size, (ch, cw))
        canvas = Image.new("RGB", (cw, ch), PAD_COLOUR)
        canvas.paste(img.resize((w, h), resample=RESAMPLE, reducing_gap=None), ((cw - w) // 2, (ch - h) // 2))
        return canvas

    def views(self, img: Image.Image) -> list[Image.Image]:
        """The base view and the S x S tiles, row-major, as PIL images (before the encoder's recipe)."""
        img = img.convert("RGB")
        S = self.layout.tile
        canvas = self.canvas_image(img)
        tiles = [
            canvas.crop((x, y, x + S, y + S)) for y in range(0, canvas.height, S) for x in range(0, canvas.width, S)
        ]
        return [img.resize((S, S), resample=RESAMPLE, reducing_gap=None), *tiles]

    def base_view(self, img: Image.Image) -> torch.Tensor:
        """The base view alone, [1, 3, S, S]: an image of several in a sample, or a video frame (OneVision)."""
        S = self.layout.tile
        return self.tile_preprocess(img.convert("RGB").resize((S, S), resample=RESAMPLE, reducing_gap=None))[None]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.tile_preprocess(view) for view in self.views(img)])  # [1 + rows*cols, 3, S, S]
