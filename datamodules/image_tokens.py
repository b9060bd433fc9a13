"""How many image tokens a record's images take, before any is decoded: the length checks, the record index and
`group_by_length` read these counts (and TensorBoard's HPARAMS their summary over the training set:
`image_token_stats`), and the dataset expands each placeholder to the same count.

A plain tower takes every image at its own input size: `num_tokens` each, whatever the file (the fast path: no
file is opened). A tiling tower (AnyRes, encoders/anyres/) takes an image of height x width in a number of views
and tokens that depend on that size; it is read from the file's header (PIL's `Image.open(...).size` decodes no
pixels), turned as `images.load_image` turns it (EXIF orientations 5-8 swap the sides) and squared as
`data.pad_to_square` squares it, so the count is the one the decoded image gets.

Several images in one record (`image: [paths]`, one placeholder each): `data.multi_image` "base" follows
LLaVA-OneVision (transformers' `LlavaOnevisionModel.get_image_features`: a sample with more than one image takes
each at its base view alone, no tiles, and one learned newline after it); "tiles" tiles each as a single image.
Video frames (datamodules/video.py) are base views, pooled 2x2 with `data.video_pool` (OneVision's
`apply_pooling`), the newline after the last frame. The view flags travel with each image as the third column
of a batch's `image_sizes` [M, 3] (foundation/views.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from foundation.views import VIEW_BASE_ONLY, VIEW_NEWLINE, VIEW_POOL

MULTI_IMAGE = ("base", "tiles")
EXIF_ORIENTATION = 0x0112
SWAPPED = (5, 6, 7, 8)  # orientations that turn the image by 90 degrees (ImageOps.exif_transpose)


def header_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as `load_image` will return it, from its header only. OSError when the
    header cannot be read. A PNG's eXIf chunk after its pixels is not read: such a rotated PNG is counted
    unturned in the index (its length, for grouping and the length check), while the data expands the
    placeholder by the decoded image, so ids and pixels still agree."""
    with Image.open(path) as img:
        w, h = img.size
        try:
            if img.format == "PNG":  # Pillow's PNG getexif decodes the whole image to look for an eXIf chunk
                exif = Image.Exif()  # after the pixels (8.9 ms for a 400 x 600 photo, 42 us for a JPEG's
                if img.info.get("exif"):  # header): only a chunk before them (Pillow writes it there) is read
                    exif.load(img.info["exif"])
            else:
                exif = img.getexif()
            turned = exif.get(EXIF_ORIENTATION) in SWAPPED
        except (OSError, ValueError, SyntaxError):  # a damaged EXIF block: load_image ignores it too
            turned = False
    return (w, h) if turned else (h, w)


@dataclass(frozen=True)
class ImageTokens:
    """Image tokens per image, from its size and view flags (picklable: DataLoader workers and index builders copy it).

    Attributes:
        num_tokens: a plain tower's tokens per image (the base view's with a tiling).
        count: (height, width, flags) -> tokens for a tower whose count depends on the size
            (`AnyResPreprocess.num_image_tokens`), None for a plain tower.
        views: (height, width, flags) -> encoder images (`AnyResPreprocess.num_tiles`), None: 1.
        pad_to_square: `data.pad_to_square` (the size the tower sees is the square's).
        multi_image: `data.multi_image`, "base" (OneVision) | "tiles".
        video_pool: `data.video_pool`: frames pooled 2x2.
    """

    num_tokens: int
    count: Callable[[tuple[int, int, int]], int] | None = None
    views: Callable[[tuple[int, int, int]], int] | None = None
    pad_to_square: bool = False
    multi_image: str = "base"
    video_pool: bool = True

    @property
    def sized(self) -> bool:
        """Whether the count depends on the image's size (then headers are read)."""
        return self.count is not None

    def key(self) -> str:
        """What the counts depend on, for the record index's key."""
        rule = getattr(self.count, "__self__", None)
        layout = getattr(rule, "layout", None)
        return f"{self.num_tokens}|{layout!r}|{self.pad_to_square}|{self.multi_image}|{self.video_pool}"

    def image_flags(self, num_images: int) -> int:
        """VIEW_* flags of each image of a record with `num_images` images."""
        return VIEW_BASE_ONLY | VIEW_NEWLINE if num_images > 1 and self.multi_image == "base" else 0

    def frame_flags(self, last: bool) -> int:
        """VIEW_* flags of a video frame (the newline after the last one)."""
        return VIEW_BASE_ONLY | (VIEW_POOL if self.video_pool else 0) | (VIEW_NEWLINE if last else 0)

    def seen_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size the tower receives for an image of `size`: squared by `pad_to_square`."""
        if self.pad_to_square:
            side = max(size)
            return side, side
        return tuple(size)

    def tokens(self, size: tuple[int, int], flags: int) -> int:
        """Tokens of one image of `size` (height, width as loaded) with `flags`."""
        if self.count is None:
            return self.num_tokens
        return self.count((*self.seen_size(size), flags))

    def num_views(self, size: tuple[int, int], flags: int) -> int:
        return 1 if self.views is None else self.views((*self.seen_size(size), flags))

    def of_files(self, paths: list[str]) -> int:
        """Tokens of a record's images (files that exist), headers read only when the count depends on the size.
        OSError when a header cannot be read."""
        flags = self.image_flags(len(paths))
        if self.count is None:
            return self.num_tokens * len(paths)
        return sum(self.tokens(header_size(p), flags) for p in paths)

    def of_video(self, size: tuple[int, int], frames: int) -> int:
        """Tokens of `frames` sampled frames of a video whose frames are `size`."""
        if self.count is None:
            return self.num_tokens * frames
        return sum(self.tokens(size, self.frame_flags(k == frames - 1)) for k in range(frames))


def image_tokens_of(spec, pad_to_square: bool, multi_image: str = "base", video_pool: bool = True) -> ImageTokens:
    """The rule of an `ImageSpec` (its `preprocess` counts per size when it is a tiling's, else `num_tokens`)."""
    count = getattr(spec.preprocess, "num_image_tokens", None)
    views = getattr(spec.preprocess, "num_tiles", None)
    return ImageTokens(spec.num_tokens, count, views, pad_to_square, multi_image, video_pool)


@dataclass(frozen=True)
class ImageTokenStats:
    """Image tokens per image over a training set's images, from its record index's counts (per record: its
    images' tokens together and their number; a video is one image, its frames' tokens together).

    Attributes:
        mean: all the images' tokens over their number (each record as often as an epoch takes it).
        min: the fewest an image takes (a record of several images counts as their mean).
        max: the most an image takes, the same way.
    """

    mean: float
    min: float
    max: float


def image_token_stats(
    tokens: np.ndarray, images: np.ndarray, weights: np.ndarray | None = None
) -> ImageTokenStats | None:
    """The stats of records with `tokens` image tokens [N] over `images` images [N] each, record k taken
    `weights[k]` times an epoch (float [N]; None: once); None when no record taken has an image."""
    taken = images > 0 if weights is None else (images > 0) & (weights > 0)
    if not taken.any():
        return None
    tokens, images = tokens[taken].astype(np.float64), images[taken].astype(np.float64)
    w = 1.0 if weights is None else weights[taken]
    per_image = tokens / images
    mean = float((w * tokens).sum() / (w * images).sum())
    return ImageTokenStats(mean=mean, min=float(per_image.min()), max=float(per_image.max()))
