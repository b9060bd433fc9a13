"""What TensorBoard's HPARAMS tab reports of the image tokens (lit_modules/callbacks/run_summary.py): a plain tower's
count per image, and for AnyRes the range per image at the example sizes and the count per view, both against
LLaVA-NeXT's rule computed here with transformers' own helpers, and the same figures `--describe` prints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from encoders.token_counts import EXAMPLE_SIZES
from experiment.describe import build_on_meta, describe
from lit_modules.callbacks.run_summary import comparison_hparams
from tests.support.tiny_models import TINY_CLIP, TINY_CLIP_ENCODER, TINY_VIT, TINY_VIT_IMAGE_SIZE

S = TINY_CLIP["image_size"]  # the tile side, 32 px
GRID = S // TINY_CLIP["patch_size"]  # 4 x 4 tokens per view
TILINGS = {  # name -> (model.tiling, transformers' image_grid_pinpoints for the same canvases, anyres_max_N)
    "up_to_2x2": ("{name: anyres, grid_pinpoints: '(1x1),...,(2x2)'}", 2, None),
    "up_to_3x3": ("{name: anyres, grid_pinpoints: '(1x1),...,(3x3)'}", 3, None),
    "up_to_3x3_max_2": ("{name: anyres, grid_pinpoints: '(1x1),...,(3x3)', max_tiles: 2}", 3, 2),
}


def llava_next_count(size: tuple[int, int], tiles: int, max_tiles: int | None) -> tuple[int, int]:
    """(image tokens, encoder views) of an image of `size` (height, width) by LLaVA-NeXT's AnyRes, the canvases every
    grid up to `tiles` x `tiles` of S px tiles. From transformers' helpers: the best-fit canvas in tiles
    (`get_anyres_image_grid_shape`: most of the image kept, then least canvas wasted) and the views, the base view and
    rows x cols tiles (`image_size_to_num_patches`); the tiles' feature map [rows*4, cols*4] cut back to the image's
    aspect ratio (`unpad_image`). Restated from LLaVA-OneVision's `anyres_max_N` (`pack_image_features`): a map over
    N tiles' worth of cells by a factor r > 1.1 per side is resized to [h // r, w // r]. Then the LLM sees the base
    view's 4 x 4 and the map row by row, one newline after each row."""
    pinpoints = [[h * S, w * S] for w in range(1, tiles + 1) for h in range(1, tiles + 1)]
    rows, cols = get_anyres_image_grid_shape(list(size), pinpoints, S)
    views = image_size_to_num_patches(list(size), pinpoints, S)
    h, w = unpad_image(torch.zeros(1, rows * GRID, cols * GRID), list(size)).shape[1:]
    if max_tiles is not None:
        r = math.sqrt(h * w / (max_tiles * GRID * GRID))
        if r > 1.1:
            h, w = int(h // r), int(w // r)
    return GRID * GRID + h * (w + 1), views


def hparams_of(cfg) -> dict:
    """`comparison_hparams` of the experiment's model (built on the meta device, as training builds it) for a
    stand-in trainer and module: one device, no accumulation."""
    model, _ = build_on_meta(cfg)
    module = SimpleNamespace(hparams={"config": OmegaConf.to_container(cfg, resolve=True)}, model=model)
    trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=10)
    return comparison_hparams(trainer, module)


def test_a_plain_tower_reports_its_tokens_per_image(tiny_cfg):
    hparams = hparams_of(tiny_cfg())  # the quickstart's ViT: 32 px in 8 px patches, one view per image
    assert hparams["image_tokens"] == (TINY_VIT_IMAGE_SIZE // TINY_VIT["patch_size"]) ** 2 == 16
    assert hparams["tiling"] == "none"
    assert not {"image_tokens_min", "image_tokens_per_view", "image_views"} & set(hparams)


@pytest.mark.parametrize("name", TILINGS)
def test_a_tiling_reports_the_range_per_image_and_the_count_per_view(tiny_cfg, name):
    tiling, tiles, max_tiles = TILINGS[name]
    cfg = tiny_cfg(TINY_CLIP_ENCODER, f"model.tiling={tiling}")
    counts = [llava_next_count(size, tiles, max_tiles) for size in EXAMPLE_SIZES]
    hparams = hparams_of(cfg)
    assert hparams["tiling"] == "anyres"
    assert hparams["image_tokens_per_view"] == GRID * GRID
    assert hparams["image_tokens"] == max(n for n, _ in counts)
    assert hparams["image_tokens_min"] == min(n for n, _ in counts)
    assert hparams["image_views"] == max(v for _, v in counts)
    # `--describe` budgets the sequence for the same largest count
    budget = cfg.data.max_length - hparams["image_tokens"]
    assert f"= {hparams['image_tokens']} image tokens + {budget} text tokens" in describe(cfg)


def test_tilings_that_share_a_tower_differ_in_hparams(tiny_cfg):
    """The complaint this answers: runs with other grid pinpoints or max_tiles had the same `image_tokens` (the
    per-view count) and looked alike in HPARAMS."""
    keys = ("image_tokens", "image_tokens_min", "image_views")
    seen = {}
    for name, (tiling, _, _) in TILINGS.items():
        hparams = hparams_of(tiny_cfg(TINY_CLIP_ENCODER, f"model.tiling={tiling}"))
        seen[name] = tuple(hparams[k] for k in keys)
    assert len(set(seen.values())) == len(TILINGS), seen
