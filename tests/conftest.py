"""Shared fixtures: a tiny built-in dataset, its tokenizer, and the quickstart config shrunk to seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from tests
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
    from datamodules import generate_shapes

    return generate_shapes(
        str(tmp_path_factory.mktemp("data") / "shapes"), seed=0, image_size=32, num_train=48, num_val=8
    )


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    from datamodules import load_tokenizer

    return load_tokenizer(os.path.join(shapes_root, "tokenizer"))


def tiny_overrides(shapes_root: str, run_root: str) -> list[str]:
    """The quickstart shrunk to seconds: 32 px images, 2-block ViT, 2-layer Llama, 48 samples."""
    return [
        "model.encoder.image_size=32",
        "model.encoder.model_kwargs={patch_size: 8, depth: 3, embed_dim: 32, num_heads: 2}",
        "model.llm.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
        " num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}",
        f"data.builtin.root={shapes_root}",
        "data.builtin.image_size=32",
        "data.builtin.num_train=48",
        "data.builtin.num_val=8",
        "data.batch_size=8",
        "data.max_length=96",
        f"logging.root={run_root}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "eval.max_new_tokens=4",
    ]


@pytest.fixture
def tiny_cfg(shapes_root, tmp_path):
    from config import load_config

    def make(*extra: str, path: str | None = None):
        return load_config(path, tiny_overrides(shapes_root, str(tmp_path / "runs")) + list(extra))

    return make
