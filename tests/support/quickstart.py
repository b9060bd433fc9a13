"""The quickstart experiment shrunk to seconds: the tiny ViT and Llama on 48 built-in samples of 32 px."""

from __future__ import annotations

from tests.support.tiny_models import TINY_LLM, TINY_VIT_ENCODER, TINY_VIT_IMAGE_SIZE


def tiny_overrides(shapes_root: str, run_root: str) -> list[str]:
    """The quickstart shrunk to seconds: 32 px images, 3-block ViT, 2-layer Llama, 48 samples."""
    return [
        *TINY_VIT_ENCODER,
        TINY_LLM,
        f"data.builtin.root={shapes_root}",
        f"data.builtin.image_size={TINY_VIT_IMAGE_SIZE}",
        "data.builtin.num_train=48",
        "data.builtin.num_val=8",
        "data.batch_size=8",
        "data.max_length=96",
        f"logging.root={run_root}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "eval.max_new_tokens=4",
    ]
