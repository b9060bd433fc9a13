"""The contract every vision encoder follows.

A `VisionEncoder` owns its preprocessing (`preprocess`: PIL image -> normalised [3, S, S], equal to its
official processor; the constants `image_size`, `pixel_mean`, `pixel_std`), its layer choice and its
output layout, so nothing outside `encoders/` branches on an encoder's name (prismatic-vlms'
`VisionBackbone` and timm's `forward_intermediates` follow the same idea).

Preprocessing. `encoder.preprocess(image)` takes a PIL RGB image of any size and returns the float32
tensor [3, S, S] `forward` takes (after stacking), normalised with `pixel_mean` / `pixel_std`. Each family
sets it in its builder (encoders/preprocess.py): the `clip` family the checkpoint directory's
preprocessor_config.json (CLIPImageProcessor / SiglipImageProcessor arithmetic) or OpenAI CLIP's recipe,
`sam_vit_b` segment-anything's (longest side, pad bottom-right), `timm:` timm's eval transform
(`resolve_data_config` + `create_transform`). It reads no weights and keeps any tensors on the CPU, so a
meta-device build has a working one, and it pickles (DataLoader workers). A wrapper forwards the inner
encoder's unless it changes the input (INF-LLaVA's module: the inner recipe at n*S, `scaled(n)`). An
encoder that sets none gets CLIP's recipe at its `image_size` with its `pixel_mean` / `pixel_std`
(shortest edge, centre crop, bicubic).

Images of any size (a tiling wrapper, encoders/anyres/). `num_image_tokens((h, w))` is how many embeddings
the LLM sees for one image of that size as preprocessing receives it, and `pack(tokens, image_sizes, newline)`
turns the projected tokens of a batch's encoder images [K, N, D] into the LLM's image embeddings [L, D]. For a
plain encoder one image is one encoder image: `num_tokens` each, and `pack` flattens. A tiling wrapper's
`preprocess` returns [T, 3, S, S] per image (its views; T = `preprocess.num_tiles((h, w))`); a batch then
concatenates every image's views and carries `image_sizes` [M, 2] (height, width), which `pack` needs, or [M, 3]
with each image's layout flags (foundation/views.py: LLaVA-OneVision's base view alone for several images or
video frames; a size argument may then be (height, width, flags)). With `uses_image_newline` the VLM holds a
learned newline embedding [D] and passes it to `pack`.

Wrappers (a token reducer, INF-LLaVA's dual-perspective module, AnyRes) subclass `encoders.wrapper.EncoderWrapper`:
they keep the wrapped encoder as `self.inner`, satisfy the same contract themselves and name their own
trainable part in `part`, so the training code can freeze or unfreeze "encoder", "reducer" and
"enhancer" apart.

Meta device = shapes only. Building any encoder under `with torch.device("meta"):` reads no weights:
a builder skips loading its checkpoint's weights and does not require the weights file to exist
(`encoders.weights.on_meta_device`), and a timm `pretrained=True` downloads nothing. What defines
the architecture and the preprocessing is still read when the checkpoint is a directory that holds it
(the `clip` family reads `config.json` and `preprocessor_config.json`), so a meta build has the same
`image_size`, `grid_size`, `embed_dim`, `pixel_mean`, `pixel_std` and parameter shapes as the real
build. A family that cannot know its architecture without such a file (`clip` with a checkpoint
directory lacking config.json) raises ValueError naming the file. This is what lets the whole VLM be
built on the meta device, with the very builders training uses, to count parameters and FLOPs and to
read the preprocessing spec.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from torch import nn

from encoders.preprocess import default_preprocess


class _Preprocess:
    """`VisionEncoder.preprocess`: what the builder set, else CLIP's recipe from the contract constants."""

    def __get__(self, encoder: Any, owner: type | None = None) -> Any:
        if encoder is None:
            return self
        own = encoder.__dict__.get("_own_preprocess")
        return own if own is not None else default_preprocess(encoder.image_size, encoder.pixel_mean, encoder.pixel_std)

    def __set__(self, encoder: Any, value: Callable[[Image.Image], torch.Tensor]) -> None:
        encoder.__dict__["_own_preprocess"] = value


class VisionEncoder(nn.Module):
    """Base class: pixels [B, 3, S, S] (already normalised) -> tokens [B, grid_h * grid_w, embed_dim].

    Subclasses set the attributes below in `__init__` and implement `forward`.

    Attributes:
        image_size: native square input side S in pixels.
        grid_size: (grid_h, grid_w) of the output tokens, row-major.
        embed_dim: width C of each output token.
        pixel_mean: per-channel mean on the 0-1 scale, subtracted before `forward`.
        pixel_std: per-channel std on the 0-1 scale.
        preprocess: PIL RGB image -> normalised float32 [3, S, S], the encoder's official recipe; a
            picklable object with `image_size`, `pixel_mean`, `pixel_std` and `scaled(n)` (the same
            recipe at n*S), see encoders/preprocess.py.
        part: name of the trainable part this module's own parameters belong to.
        uses_image_newline: `pack` marks rows with a learned newline embedding the VLM holds (LLaVA-NeXT).
    """

    image_size: int
    grid_size: tuple[int, int]
    embed_dim: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    preprocess = _Preprocess()
    part: str = "encoder"
    uses_image_newline: bool = False

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Embeddings the LLM sees for one image of `image_size` (height, width): `num_tokens` for a tower
        that takes every image at its own size; a tiling wrapper's count depends on the size."""
        return self.num_tokens

    def num_views(self, image_size: tuple[int, int]) -> int:
        """Encoder images (`forward` inputs) per image of `image_size`: 1, or a tiling's base view + tiles."""
        return 1

    def pack(
        self, tokens: torch.Tensor, image_sizes: torch.Tensor | None, newline: torch.Tensor | None
    ) -> torch.Tensor:
        """Projected tokens of the batch's encoder images [K, N, D] -> the LLM's image embeddings [L, D], in
        image order. One image is one encoder image here, so this flattens (`image_sizes` [M, 2] and
        `newline` [D] are for tiling wrappers)."""
        return tokens.reshape(-1, tokens.shape[-1])  # [K*N, D]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward to save memory; wrappers pass it on to `inner`."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def check_input(self, pixels: torch.Tensor) -> None:
        """Fail with a clear message on an input the encoder cannot take."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} takes {self.image_size}x{self.image_size} images, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]}; preprocess with the encoder's image_size"
            )
