"""Token reducers (every kind in `REDUCERS`): shapes, row-major order, hand-computed pooling, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import REDUCERS, EncoderWrapper, encoder_chain, split_parts
from encoders.base import VisionEncoder
from encoders.sam import SamImageEncoder, sam_vit_b
from encoders.token_reducer import TokenReducer
from tests.support.tiny_models import TINY_SAM


class PixelEncoder(VisionEncoder):
    """Stand-in encoder with a grid x grid token grid: token (i, j) is a 1x1 conv of pixel (i, j)."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.image_size = grid
        self.grid_size = (grid, grid)
        self.embed_dim = dim
        self.pixel_mean = (0.1, 0.2, 0.3)
        self.pixel_std = (0.4, 0.5, 0.6)
        self.proj = nn.Conv2d(3, dim, kernel_size=1)
        self.checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, grid*grid, dim], row-major


def test_conv_shapes_sam_sized():
    # SAM's 64x64x256 -> two stride-2 convs -> 16x16 = 256 tokens of width 1024 (Vary, DeepSeek-VL)
    torch.manual_seed(0)
    reducer = REDUCERS.build("conv", PixelEncoder(grid=64, dim=256))
    tokens = reducer(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 256, 1024)
    assert (reducer.grid_size, reducer.embed_dim, reducer.num_tokens) == ((16, 16), 1024, 256)
    # Vary's net_2 + net_3: 256*512*9 + 512*1024*9, no biases
    assert sum(p.numel() for p in reducer.layers.parameters()) == 5_898_240


def test_conv_channels_configurable():
    reducer = REDUCERS.build("conv", PixelEncoder(grid=16, dim=8), channels=(12,))
    assert reducer(torch.randn(1, 3, 16, 16)).shape == (1, 64, 12)
    assert (reducer.grid_size, reducer.embed_dim) == ((8, 8), 12)


def test_conv_equals_convolving_the_token_grid():
    torch.manual_seed(0)
    encoder = PixelEncoder(grid=8, dim=4)
    reducer = REDUCERS.build("conv", encoder, channels=(6, 5))
    pixels = torch.randn(2, 3, 8, 8)
    grid = encoder.proj(pixels)  # [B, 4, 8, 8], straight from the conv, never flattened
    for conv in reducer.layers:
        grid = torch.nn.functional.conv2d(grid, conv.weight, stride=2, padding=1)
    expected = grid.permute(0, 2, 3, 1).reshape(2, 4, 5)  # [B, 2*2, 5], row-major
    torch.testing.assert_close(reducer(pixels), expected)


def test_avgpool_matches_hand_computation():
    # channel 0 of pixel (i, j) = 64 * i + j and the encoder copies it, so each token holds its own
    # row-major index; a 4x4 average then holds the mean index of its block: 64*(4r+1.5) + (4c+1.5)
    encoder = PixelEncoder(grid=64, dim=1)
    with torch.no_grad():
        encoder.proj.weight.zero_()
        encoder.proj.weight[0, 0] = 1.0
        encoder.proj.bias.zero_()
    pixels = torch.zeros(1, 3, 64, 64)
    pixels[0, 0] = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    reducer = REDUCERS.build("avgpool", encoder)
    tokens = reducer(pixels)  # [1, 256, 1]
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    expected = 64 * (4 * rows + 1.5) + (4 * cols + 1.5)
    assert tokens.shape == (1, 256, 1)
    torch.testing.assert_close(tokens[0, :, 0], expected.flatten())


def test_avgpool_factor_and_width():
    reducer = REDUCERS.build("avgpool", PixelEncoder(grid=64, dim=256), factor=2)
    assert reducer(torch.randn(1, 3, 64, 64)).shape == (1, 1024, 256)
    assert (reducer.grid_size, reducer.embed_dim) == ((32, 32), 256)
    assert list(reducer.layers.parameters()) == []


def test_contract_follows_inner():
    encoder = PixelEncoder(grid=16, dim=8)
    reducer = REDUCERS.build("conv", encoder, channels=(16, 32))
    assert isinstance(reducer, VisionEncoder) and reducer.inner is encoder
    assert reducer.part == "reducer"
    assert (reducer.image_size, reducer.pixel_mean, reducer.pixel_std) == (16, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    reducer.set_grad_checkpointing(True)
    assert encoder.checkpointing
    parts = split_parts(reducer)
    assert [n for n, _ in parts["reducer"]] == ["layers.0.weight", "layers.1.weight"]
    assert [n for n, _ in parts["encoder"]] == ["inner.proj.weight", "inner.proj.bias"]
    with pytest.raises(ValueError, match="takes 16x16 images"):
        reducer(torch.zeros(1, 3, 32, 32))


def test_gradients_reach_reducer_not_frozen_inner():
    torch.manual_seed(0)
    encoder = PixelEncoder(grid=16, dim=8).requires_grad_(False)
    reducer = REDUCERS.build("conv", encoder, channels=(16, 32))
    reducer(torch.randn(2, 3, 16, 16)).square().mean().backward()
    assert all(p.grad is None for p in encoder.parameters())
    for p in reducer.layers.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_wraps_sam():
    torch.manual_seed(0)
    sam = SamImageEncoder(**TINY_SAM)
    reducer = REDUCERS.build("conv", sam, channels=(24, 48))
    assert reducer(torch.randn(1, 3, 128, 128)).shape == (1, 4, 48)  # 8x8 -> 2x2
    with torch.device("meta"):
        vary = REDUCERS.build("conv", sam_vit_b())
    assert (vary.image_size, vary.grid_size, vary.embed_dim) == (1024, (16, 16), 1024)


def test_bad_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="unknown reducer 'maxpool'; choose one of: avgpool, conv$"):
        REDUCERS.build("maxpool", PixelEncoder(grid=16, dim=8))
    with pytest.raises(ValueError, match="unknown reducer 'pixelshuffle'; choose one of: avgpool, conv$"):
        REDUCERS.get("pixelshuffle")


def test_options_of_another_kind_are_rejected():
    expected = r"reducer 'avgpool' got unknown option\(s\) \['channels'\]; valid options: \['factor'\]"
    with pytest.raises(ValueError, match=expected):
        REDUCERS.build("avgpool", PixelEncoder(grid=16, dim=8), channels=(4,))
    assert REDUCERS.options("conv") == ["channels"]  # the wrapped encoder is the caller's, not an option


@pytest.mark.parametrize("kind", REDUCERS.names())
def test_every_kind_is_a_reducer_around_its_encoder(kind):
    encoder = PixelEncoder(grid=16, dim=8)
    reducer = REDUCERS.build(kind, encoder)
    assert isinstance(reducer, TokenReducer) and isinstance(reducer, EncoderWrapper)
    assert encoder_chain(reducer) == [reducer, encoder] and reducer.part == "reducer"
    grid = reducer.grid_size[0]
    assert 16 % grid == 0 and reducer.grid_size == (grid, grid)
    tokens = reducer(torch.randn(2, 3, 16, 16))
    assert tokens.shape == (2, grid * grid, reducer.embed_dim) and torch.isfinite(tokens).all()


def test_grid_not_divisible():
    with pytest.raises(ValueError, match="grid 6x6 is not divisible by it"):
        REDUCERS.build("conv", PixelEncoder(grid=6, dim=8))  # shrinks by 4
    with pytest.raises(ValueError, match="shrinks the grid by 4"):
        REDUCERS.build("avgpool", PixelEncoder(grid=10, dim=8), factor=4)
