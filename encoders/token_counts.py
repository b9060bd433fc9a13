"""What the LLM sees of images of given sizes: image tokens and encoder views per image, computed once here for
everything that reports them (`--describe` in experiment/describe.py, TensorBoard's HPARAMS in
lit_modules/callbacks/run_summary.py), so the reports agree.

A plain tower takes every image at its input size: `num_tokens` per image, whatever the size. A tiling
(encoders/anyres/) feeds an image as `num_views((h, w))` encoder views and the LLM sees `num_image_tokens((h, w))`,
which depends on the image's size; its per-view `num_tokens` then says little about the sequence, so the counts
are given at a few sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from encoders.base import VisionEncoder

# Image sizes (height, width) whose token counts are reported for a tower whose count depends on the size (a
# tiling) when none are asked for: a VGA / COCO photo, XGA, a Full HD screenshot, an A4 page at 150 dpi.
EXAMPLE_SIZES = ((480, 640), (768, 1024), (1080, 1920), (1754, 1240))


@dataclass(frozen=True)
class ImageTokenCounts:
    """Image tokens and encoder views of one vision tower for images of some sizes.

    Attributes:
        per_view: tokens of one encoder view (`num_tokens`: its grid, with a CLS where the tower keeps one).
        sizes: the images' (height, width).
        tokens: image tokens the LLM sees for each of `sizes` (`num_image_tokens`).
        views: encoder views (`forward` inputs) for each of `sizes` (`num_views`).
    """

    per_view: int
    sizes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    views: tuple[int, ...]

    @property
    def varies(self) -> bool:
        """Whether the count depends on the image's size (a tiling): it differs from one view's at some size."""
        return any(n != self.per_view for n in self.tokens)

    @property
    def tiled(self) -> bool:
        """Whether some image is fed as more than one encoder view."""
        return any(v != 1 for v in self.views)


def image_token_counts(vision: VisionEncoder, sizes=EXAMPLE_SIZES) -> ImageTokenCounts:
    """The counts of `vision` (the outermost wrapper: what the VLM holds) for images of `sizes` (height, width)."""
    sizes = tuple((int(h), int(w)) for h, w in sizes)
    tokens = tuple(vision.num_image_tokens(s) for s in sizes)
    return ImageTokenCounts(vision.num_tokens, sizes, tokens, tuple(vision.num_views(s) for s in sizes))
