"""Token reducers: fewer, wider image tokens for the LLM, as a wrapper that is itself a `VisionEncoder`.

SAM ViT-B gives 64x64 = 4096 tokens at 1024 px, too many for an LLM context. Vary (Wei et al. 2023,
https://arxiv.org/abs/2312.06109) and DeepSeek-VL (https://arxiv.org/abs/2403.05525) append two
stride-2 3x3 convolutions (256 -> 512 -> 1024 channels, no bias, no activation between them) to
SAM's neck: 16x16 = 256 tokens of width 1024. "avgpool" is the parameter-free baseline.

Each kind is one builder registered in `REDUCERS` (`REDUCERS.build("conv", encoder, channels=...)`);
the registry validates the kind's options. The reducer is trainable on its own (`part = "reducer"`),
so a stage can train it with the encoder frozen. Tokens stay row-major:
[B, N, C] -> [B, C, h, w] -> reduce -> [B, N', C'].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from encoders.base import VisionEncoder
from encoders.wrapper import EncoderWrapper
from foundation.registry import Registry

REDUCERS = Registry("reducer", inputs=("encoder",))


class TokenReducer(EncoderWrapper):
    """Wraps `encoder` and shrinks its token grid with `layers`, applied to the grid [B, C, h, w].

    Args:
        encoder: the wrapped encoder, kept as `self.inner`.
        layers: maps [B, C, h, w] to [B, embed_dim, h / reduction, w / reduction].
        reduction: how many times the grid shrinks per side; the encoder's grid must be divisible by it.
        embed_dim: width of the reduced tokens.
        kind: the registry name, for messages.
    """

    part = "reducer"

    def __init__(self, encoder: VisionEncoder, *, layers: nn.Module, reduction: int, embed_dim: int, kind: str) -> None:
        super().__init__(encoder)
        grid_h, grid_w = encoder.grid_size
        if grid_h % reduction or grid_w % reduction:
            # a stride-2 conv would silently round up, avgpool silently drop the last row/column
            raise ValueError(
                f"{kind} token reducer shrinks the grid by {reduction} per side, but the encoder's "
                f"grid {grid_h}x{grid_w} is not divisible by it"
            )
        self.kind = kind
        self.layers = layers
        self.reduction = reduction
        self.grid_size = (grid_h // reduction, grid_w // reduction)
        self.embed_dim = embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        tokens = self.inner(pixels)  # [B, h*w, C], row-major
        batch, _, width = tokens.shape
        grid_h, grid_w = self.inner.grid_size
        x = tokens.transpose(1, 2).reshape(batch, width, grid_h, grid_w)  # [B, C, h, w]
        x = self.layers(x)  # [B, C', h/r, w/r]
        return x.flatten(2).transpose(1, 2)  # [B, N', C'], row-major


@REDUCERS.register("conv")
def conv(encoder: VisionEncoder, channels: Sequence[int] = (512, 1024)) -> TokenReducer:
    """Stride-2 3x3 convolutions, no bias, no activation (Vary's net_2/net_3, DeepSeek-VL's SAM downsamples).

    Args:
        encoder: the encoder whose tokens are reduced.
        channels: output channels of each conv; the grid shrinks by 2 ** len(channels) per side and
            the token width becomes channels[-1]. (512, 1024) takes SAM's 64x64x256 to 16x16x1024.
    """
    if len(channels) == 0:
        raise ValueError("conv token reducer needs at least one entry in channels")
    dims = [encoder.embed_dim, *channels]
    layers = nn.Sequential(
        *(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
            for c_in, c_out in zip(dims[:-1], dims[1:])
        )
    )
    return TokenReducer(encoder, layers=layers, reduction=2 ** len(channels), embed_dim=dims[-1], kind="conv")


@REDUCERS.register("avgpool")
def avgpool(encoder: VisionEncoder, factor: int = 4) -> TokenReducer:
    """Average pooling over factor x factor windows: the parameter-free baseline; the width is unchanged.

    Args:
        encoder: the encoder whose tokens are reduced.
        factor: pooling window and stride per side.
    """
    if factor < 1:
        raise ValueError(f"avgpool factor must be >= 1, got {factor}")
    layers = nn.AvgPool2d(kernel_size=factor, stride=factor)
    return TokenReducer(encoder, layers=layers, reduction=factor, embed_dim=encoder.embed_dim, kind="avgpool")
