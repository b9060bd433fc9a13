"""What TensorBoard's HPARAMS tab reports of the image tokens (lit_modules/callbacks/run_summary.py): a plain tower's
count per image, and for AnyRes the mean, fewest and most per image of the run's own training images (from the record
index), or without them the range at the example sizes, and the count per view, all against LLaVA-NeXT's rule
computed here with transformers' own helpers, and the same figures `--describe` prints."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from datamodules import ImageSpec, LLaVADataModule
from datamodules.mixture import MixtureSamples
from datamodules.shards import ShardSamples
from encoders.token_counts import EXAMPLE_SIZES
from experiment.assemble import build_tokenizer
from experiment.describe import build_on_meta, describe
from foundation.schema import DataConfig, SourceConfig
from lit_modules.callbacks.run_summary import comparison_hparams
from tests.support.tiny_models import TINY_CLIP, TINY_CLIP_ENCODER, TINY_VIT, TINY_VIT_IMAGE_SIZE

S = TINY_CLIP["image_size"]  # the tile side, 32 px
GRID = S // TINY_CLIP["patch_size"]  # 4 x 4 tokens per view
TILINGS = {  # name -> (model.tiling, transformers' image_grid_pinpoints for the same canvases, anyres_max_N)
    "up_to_2x2": ("{name: anyres, grid_pinpoints: '(1x1),...,(2x2)'}", 2, None),
    "up_to_3x3": ("{name: anyres, grid_pinpoints: '(1x1),...,(3x3)'}", 3, None),
    "up_to_3x3_max_2": ("{name: anyres, grid_pinpoints: '(1x1),...,(3x3)', max_tiles: 2}", 3, 2),
}
SIZES = ((40, 600), (400, 600), (120, 80), (200, 60))  # training images (height, width), each its own AnyRes count


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


def hparams_of(cfg, *sources: list[dict], repeats: tuple[float, ...] = (), folder=None) -> dict:
    """`comparison_hparams` of the experiment's model (built on the meta device, as training builds it) for a
    stand-in trainer and module: one device, no accumulation; with `sources`, its DataModule set up on them (one
    file of records, or a mixture with each source's `repeat`), their images in `folder`."""
    model, _ = build_on_meta(cfg)
    module = SimpleNamespace(hparams={"config": OmegaConf.to_container(cfg, resolve=True)}, model=model)
    trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=10, datamodule=None)
    if sources:
        paths = [str(folder / f"part{k}.json") for k in range(len(sources))]
        for path, records in zip(paths, sources):
            json.dump(records, open(path, "w"))
        files = {"sources": [SourceConfig(file=p, repeat=r) for p, r in zip(paths, repeats)]} if repeats else {}
        data = DataConfig(train_json=None if repeats else paths[0], image_folder=str(folder), template="chatml",
                          max_length=2048, index_dir=str(folder / "index"), index_workers=1, **files)  # fmt: skip
        trainer.datamodule = LLaVADataModule(build_tokenizer(cfg), data, ImageSpec.of(model.vision), stage="sft")
        trainer.datamodule.setup()
    return comparison_hparams(trainer, module)


@pytest.fixture
def images(tmp_path):
    """A folder with one image of each of `SIZES`, `<h>x<w>.png`."""
    for h, w in SIZES:
        Image.new("RGB", (w, h), (200, 80, 40)).save(tmp_path / f"{h}x{w}.png")
    return tmp_path


def record(k: int, size: tuple[int, int] | None) -> dict:
    """An SFT record about the image of `size` (None: a text-only one)."""
    question = "What is shown?" if size is None else "<image>\nWhat is shown?"
    rec = {"id": str(k), "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "Shapes."}]}
    return rec if size is None else {**rec, "image": f"{size[0]}x{size[1]}.png"}


def test_a_plain_tower_reports_its_tokens_per_image(tiny_cfg, images):
    # the quickstart's ViT: 32 px in 8 px patches, one view per image, whatever the training images' sizes
    hparams = hparams_of(tiny_cfg(), [record(k, size) for k, size in enumerate(SIZES)], folder=images)
    assert hparams["image_tokens"] == (TINY_VIT_IMAGE_SIZE // TINY_VIT["patch_size"]) ** 2 == 16
    assert hparams["tiling"] == "none"
    assert not {"image_tokens_min", "image_tokens_max", "image_tokens_per_view", "image_views"} & set(hparams)


@pytest.mark.parametrize("name", TILINGS)
def test_a_tiling_reports_the_range_per_image_and_the_count_per_view(tiny_cfg, name):
    tiling, tiles, max_tiles = TILINGS[name]
    cfg = tiny_cfg(TINY_CLIP_ENCODER, f"model.tiling={tiling}")
    counts = [llava_next_count(size, tiles, max_tiles) for size in EXAMPLE_SIZES]
    hparams = hparams_of(cfg)
    assert hparams["tiling"] == "anyres"
    assert hparams["image_tokens_per_view"] == GRID * GRID
    assert hparams["image_tokens"] == hparams["image_tokens_max"] == max(n for n, _ in counts)
    assert hparams["image_tokens_min"] == min(n for n, _ in counts)
    assert hparams["image_views"] == max(v for _, v in counts)
    assert hparams["image_tokens_from"] == "example sizes"
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


@pytest.mark.parametrize("mixture", [False, True])
def test_a_tiling_reports_the_tokens_of_the_runs_own_images(tiny_cfg, images, mixture):
    """The complaint this answers: compare_highres/anyres.yaml reported 72 (61-72 at the example sizes) while each
    of its 256 px images takes 58. With the training data known, the figures are its images': the mean per image
    (a mixture's records as often as an epoch takes them), the fewest and the most; text-only records count none."""
    tiling, tiles, max_tiles = TILINGS["up_to_3x3_max_2"]
    cfg = tiny_cfg(TINY_CLIP_ENCODER, f"model.tiling={tiling}")
    count = {size: llava_next_count(size, tiles, max_tiles)[0] for size in SIZES}
    assert len(set(count.values())) == len(SIZES)  # the sizes tell the rule apart
    parts = [[*SIZES[:2], SIZES[1], None], [*SIZES[2:], None]]  # image sizes of each source's records
    repeats = (3.0, 1.0) if mixture else ()  # the first source taken three times an epoch
    sources = [[record(k, size) for k, size in enumerate(part)] for part in parts]
    if not mixture:
        parts, sources = [parts[0] + parts[1]], [[r for rs in sources for r in rs]]
    hparams = hparams_of(cfg, *sources, repeats=repeats, folder=images)
    weights = repeats or (1.0,)
    tokens = sum(w * count[size] for w, part in zip(weights, parts) for size in part if size is not None)
    n = sum(w * (size is not None) for w, part in zip(weights, parts) for size in part)
    assert hparams["image_tokens"] == pytest.approx(tokens / n, abs=0.005)
    assert hparams["image_tokens_min"] == min(count.values())
    assert hparams["image_tokens_max"] == max(count.values())
    assert hparams["image_tokens_per_view"] == GRID * GRID
    assert hparams["image_tokens_from"] == "training data" and "image_views" not in hparams


def test_a_tiling_without_counts_from_its_data_falls_back_to_the_example_sizes(tiny_cfg, images):
    """Text-only training data gives no count per image, nor does a mixture with a shards source (its records are
    checked as the run reads them): the figures are then the example sizes', as without a DataModule."""
    cfg = tiny_cfg(TINY_CLIP_ENCODER, f"model.tiling={TILINGS['up_to_2x2'][0]}")
    assert hparams_of(cfg, [record(k, None) for k in range(3)], folder=images) == hparams_of(cfg)
    assert hparams_of(cfg)["image_tokens_from"] == "example sizes"
    indexed = SimpleNamespace(image_tokens=np.array([58, 61]), num_images=np.array([1, 1]))  # an index's counts
    assert MixtureSamples([indexed, ShardSamples(2)]).image_tokens is None  # a mixture's: every part's, or none
    assert MixtureSamples([indexed, indexed]).image_tokens.tolist() == [58, 61, 58, 61]
