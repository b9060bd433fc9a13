"""Token reducers: fewer, wider image tokens for the LLM, as a wrapper that is itself a `VisionEncoder`.

SAM ViT-B gives 64x64 = 4096 tokens at 1024 px, too many for an LLM context. Vary (Wei et al. 2023,
https://arxiv.org/abs/2312.06109) and DeepSeek-VL (https://arxiv.org/abs/2403.05525) append two
stride-2 3x3 convolutions (256 -> 512 -> 1024 channels, no bias, no activation between them) to
SAM's neck: 16x16 = 256 tokens of width 1024. "avgpool" is the parameter-free baseline.

The reducer is trainable on its own (`part = "reducer"`), so a stage can train it with the encoder
frozen. Tokens stay row-major: [B, N, C] -> [B, C, h, w] -> reduce -> [B, N', C'].
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from encoders.base import VisionEncoder

KINDS = ("conv", "avgpool")
# options each kind accepts through `build_token_reducer`
_KIND_OPTIONS = {"conv": ("channels",), "avgpool": ("factor",)}


class TokenReducer(VisionEncoder):
    """Wraps `encoder` and shrinks its token grid.

    Args:
        encoder: the wrapped encoder, kept as `self.inner`.
        kind: "conv" (stride-2 3x3 convs, Vary / DeepSeek-VL) or "avgpool" (average pooling).
        channels: "conv" only: output channels of each stride-2 conv; the grid shrinks by
            2 ** len(channels) per side and the token width becomes channels[-1].
        factor: "avgpool" only: pooling window and stride per side; the width is unchanged.
    """

    part = "reducer"

    def __init__(
        self,
        encoder: VisionEncoder,
        *,
        kind: str = "conv",
        channels: Sequence[int] = (512, 1024),
        factor: int = 4,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown token reducer kind {kind!r}; choose one of: {', '.join(KINDS)}")
        self.inner = encoder
        self.kind = kind
        if kind == "conv":
            if len(channels) == 0:
                raise ValueError("conv token reducer needs at least one entry in channels")
            dims = [encoder.embed_dim, *channels]
            # bias=False as in Vary's net_2/net_3 and DeepSeek-VL's SAM downsamples
            self.layers = nn.Sequential(
                *(
                    nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
                    for c_in, c_out in zip(dims[:-1], dims[1:])
                )
            )
            self.reduction = 2 ** len(channels)
            self.embed_dim = dims[-1]
        else:
            if factor < 1:
                raise ValueError(f"avgpool factor must be >= 1, got {factor}")
            self.layers = nn.AvgPool2d(kernel_size=factor, stride=factor)
            self.reduction = factor
            self.embed_dim = encoder.embed_dim
        grid_h, grid_w = encoder.grid_size
        if grid_h % self.reduction or grid_w % self.reduction:
            # a stride-2 conv would silently round up, avgpool silently drop the last row/column
            raise ValueError(
                f"{kind} token reducer shrinks the grid by {self.reduction} per side, but the encoder's "
                f"grid {grid_h}x{grid_w} is not divisible by it"
            )
        self.grid_size = (grid_h // self.reduction, grid_w // self.reduction)
        self.image_size = encoder.image_size
        self.pixel_mean = encoder.pixel_mean
        self.pixel_std = encoder.pixel_std

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.inner.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        tokens = self.inner(pixels)  # [B, h*w, C], row-major
        batch, _, width = tokens.shape
        grid_h, grid_w = self.inner.grid_size
        x = tokens.transpose(1, 2).reshape(batch, width, grid_h, grid_w)  # [B, C, h, w]
        x = self.layers(x)  # [B, C', h/r, w/r]
        return x.flatten(2).transpose(1, 2)  # [B, N', C'], row-major


def build_token_reducer(encoder: VisionEncoder, kind: str, **kwargs: Any) -> TokenReducer:
    """Wrap `encoder` in a token reducer.

    Args:
        encoder: the encoder whose tokens are reduced.
        kind: "conv" (option `channels`, default (512, 1024)) or "avgpool" (option `factor`, default 4).
        **kwargs: the kind's options; options of another kind are an error, not silently ignored.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown token reducer kind {kind!r}; choose one of: {', '.join(KINDS)}")
    unknown = sorted(set(kwargs) - set(_KIND_OPTIONS[kind]))
    if unknown:
        raise ValueError(
            f"token reducer {kind!r} got unknown option(s) {unknown}; valid options: {list(_KIND_OPTIONS[kind])}"
        )
    return TokenReducer(encoder, kind=kind, **kwargs)
