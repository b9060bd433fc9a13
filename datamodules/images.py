"""Images for an encoder: a file -> PIL RGB as a person sees it -> the encoder's own preprocessing.

`load_image` opens a file the way an image viewer shows it (EXIF orientation, 16-bit and float modes
scaled, transparency composited on white, first frame of an animation). `ImageSpec` carries what the
data needs from the vision tower, including its `preprocess` (PIL RGB -> normalised [3, S, S], the
encoder's official recipe, see encoders/base.py); `ImageSpec.transform` puts LLaVA-1.5's mean-colour
pad-to-square in front of it when asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

# Transparent pixels are shown on white: transparent PNGs / GIFs (logos, icons, diagrams, screenshots,
# scanned pages with a removed background) are drawn to be seen on a light page, the way browsers and
# document viewers show them, and dark text or lines on a transparent background stay readable; the
# RGB a transparent pixel happens to store is arbitrary (often black). White does not depend on the
# encoder, so the same file gives the same picture for every encoder.
BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Grayscale "I;16*" / "I" (16-bit PNG, TIFF) and "F" (float) images -> "L" by scaling, not clipping.

    16-bit and 32-bit integer pixels are read as 0-65535 (what 16-bit PNGs hold; Pillow opens them as
    "I;16" or "I"), so 65535 -> 255 (v * 255 / 65535, rounded). Float pixels are read as 0-1 when none
    exceeds 1, else as 0-255. Pillow's own convert would clip everything above 255 (an all-white image).
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
    else:
        a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL image (current frame) -> RGB as displayed: transparency composited on `background`."""
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = _to_8bit(img)
    transparent = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not transparent:
        return img.convert("RGB")
    rgba = img.convert("RGBA")  # a palette / L / RGB transparency key becomes alpha here
    out = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(out, rgba).convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as a person sees it, as PIL RGB.

    - EXIF orientation applied (a phone photo stored sideways is turned upright);
    - 16-bit / 32-bit grayscale and float images scaled to 8 bits (`_to_8bit`), not saturated;
    - RGBA, LA, and palette or grayscale/RGB images with a transparency key composited on white
      (`BACKGROUND`, why there);
    - animated images (GIF, APNG, WebP): the first frame.

    Raises:
        OSError: the file is missing, truncated or not a readable image (PIL's `UnidentifiedImageError` is one).
    """
    with Image.open(path) as img:
        img.seek(0)  # animations: the first frame
        # A truncated file is an error here (then failed or skipped and counted), whatever PIL's global says:
        # lmms-eval sets ImageFile.LOAD_TRUNCATED_IMAGES = True when it is imported (lmms_eval/api/task.py),
        # which would load the missing part of a cut file as grey and train on it silently.
        lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = lenient
        upright = ImageOps.exif_transpose(img)  # a new image, EXIF orientation applied (a copy if none)
        return to_rgb(upright)


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically with `fill` (LLaVA-1.5's `expand2square`, offset (long - short) // 2)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def mean_colour(pixel_mean) -> tuple[int, int, int]:
    """LLaVA-1.5's pad colour: `tuple(int(x * 255) for x in image_mean)` (truncated, (122, 116, 104) for CLIP)."""
    return tuple(int(m * 255) for m in pixel_mean)


@dataclass(frozen=True)
class ImageTransform:
    """PIL RGB -> normalised [3, S, S]: LLaVA-1.5's pad-to-square (when `pad_fill` is set), then the
    encoder's own preprocessing. A picklable object, so DataLoader workers can copy it."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    pad_fill: tuple[int, int, int] | None = None

    @property
    def image_size(self) -> int:
        """S, the side of the tensors it returns."""
        return self.preprocess.image_size

    def __call__(self, img: Image.Image, base_only: bool = False) -> torch.Tensor:
        """[3, S, S], or a tiling's views [T, 3, S, S]; `base_only`: a tiling's base view alone [1, 3, S, S]."""
        if self.pad_fill is not None:
            img = expand_to_square(img, self.pad_fill)
        if base_only and hasattr(self.preprocess, "base_view"):
            return self.preprocess.base_view(img)
        return self.preprocess(img)


@dataclass(frozen=True)
class ImageSpec:
    """What the data needs from the vision tower (read from a meta-device build: no weights).

    Attributes:
        image_size: input side S in pixels.
        pixel_mean: normalisation mean per channel (0-1 scale).
        pixel_std: normalisation std per channel (0-1 scale).
        num_tokens: N image embeddings per image, what each placeholder expands to.
        preprocess: the encoder's own PIL RGB -> normalised [3, S, S] (`VisionEncoder.preprocess`; CLIP's
            recipe, `encoders.preprocess.ResizeCrop`, for an encoder without one of its own).
    """

    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    num_tokens: int
    preprocess: Callable[[Image.Image], torch.Tensor]

    @classmethod
    def of(cls, vision) -> "ImageSpec":
        """The spec of a `VisionEncoder` (any object with the contract's attributes and `preprocess`)."""
        return cls(
            vision.image_size, tuple(vision.pixel_mean), tuple(vision.pixel_std), vision.num_tokens, vision.preprocess
        )

    def transform(self, pad_to_square: bool) -> ImageTransform:
        """PIL RGB -> [3, S, S]: with `pad_to_square`, LLaVA-1.5's pad with the mean colour first."""
        return ImageTransform(self.preprocess, mean_colour(self.pixel_mean) if pad_to_square else None)
