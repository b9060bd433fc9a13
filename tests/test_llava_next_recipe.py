"""The LLaVA-NeXT recipes: the CPU-sized AnyRes quickstart trains end to end (every batch's views, image sizes and
image tokens as the tower counts them); the high-resolution comparison set: its `--describe` budgets, and each
contender trains."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from experiment.config import EXPERIMENTS_DIR, load_config
from experiment.describe import describe
from tests.support.quickstart import tiny_overrides
from tests.support.runs import LossRecorder, fit


class BatchCheck(L.Callback):
    """Per training batch: the views are those the tower takes for each image's size, and the ids hold as many
    image tokens as the tower counts for those sizes."""

    def __init__(self) -> None:
        self.images = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        vision, sizes = module.model.vision, batch["image_sizes"].tolist()
        assert batch["pixel_values"].shape[0] == sum(vision.num_views(tuple(s)) for s in sizes)
        image_tokens = int((batch["input_ids"] == module.model.image_token_id).sum())
        assert image_tokens == sum(vision.num_image_tokens(tuple(s)) for s in sizes)
        self.images += len(sizes)


def test_the_anyres_quickstart_trains_end_to_end(shapes_root, tmp_path):
    """experiments/llava_next/quickstart.yaml shrunk (32 px images and tiles, 2 LLM layers): 4 steps, every
    batch consistent with the tower, a finite loss that falls."""
    path = os.path.join(EXPERIMENTS_DIR, "llava_next", "quickstart.yaml")
    overrides = ["trainer.max_steps=4", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "optim.lr=3e-3"]
    cfg = load_config(path, tiny_overrides(shapes_root, str(tmp_path / "runs")) + overrides)
    assert cfg.model.tiling.name == "anyres"
    losses, check = LossRecorder(), BatchCheck()
    torch.manual_seed(0)
    fit(cfg, losses, check)
    values = [losses.losses[k] for k in sorted(losses.losses)]
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    assert check.images > 0 and values[-1] < values[0]


# The set's budgets for its own 256 px images (the built-in shapes at 256 px), and the views the tower encodes.
BUDGETS = {
    "single_crop.yaml": "image tokens per image: 64 (8 x 8)",
    "anyres.yaml": "256 x 256 px: 58 image tokens (17 encoder views)",
    "dcm_dem.yaml": "image tokens per image: 64 (8 x 8)",
    "sam_vit_b.yaml": "image tokens per image: 64 (8 x 8) of width 256",
}


@pytest.mark.parametrize("name", BUDGETS)
def test_the_comparison_set_describes_matched_budgets(name):
    cfg = load_config(os.path.join(EXPERIMENTS_DIR, "compare_highres", name))
    assert cfg.data.builtin.image_size == 256
    text = describe(cfg, image_sizes=[(256, 256)])
    budget = next(line for line in text.splitlines() if line.startswith(("image tokens per image", "  256")))
    print(f"{name}: {budget.strip()}")
    assert BUDGETS[name] in text


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "sam_vit_b.yaml" else n for n in BUDGETS]
)  # SAM ViT-B (89.7M parameters) at 256 px
def test_the_comparison_set_trains_end_to_end(name, tmp_path):
    """Each high-resolution contender, as its YAML sets it up (256 px built-in images), trains 2 steps on CPU with
    every batch consistent with its tower and a finite loss."""
    overrides = [
        f"data.builtin.root={tmp_path}/shapes", "data.builtin.num_train=8", "data.builtin.num_val=2",
        "data.batch_size=2", "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", f"logging.root={tmp_path}/runs",
    ]  # fmt: skip
    cfg = load_config(os.path.join(EXPERIMENTS_DIR, "compare_highres", name), overrides)
    losses, check = LossRecorder(), BatchCheck()
    torch.manual_seed(0)
    fit(cfg, losses, check)
    assert len(losses.losses) == 2 and all(math.isfinite(v) for v in losses.losses.values())
    assert check.images > 0
