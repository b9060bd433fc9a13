"""Compiled blocks (`model.compile`, model/blocks.py) and fused AdamW (`optim.fused`): the same losses as eager
and as torch's default AdamW, the module tree and state-dict keys untouched, and the compile time in the console."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from encoders import build_encoder
from experiment.assemble import build_datamodule, build_module
from experiment.runner import build_trainer
from foundation.schema import OptimConfig
from lit_modules.vlm_module import VLMModule
from model.blocks import compile_blocks, compiled_blocks, outer_blocks
from model.projector import PROJECTORS
from model.vlm import VisionLanguageModel
from tests.support.optim import optimizer_of
from tests.support.tiny_models import TINY_CLIP, TINY_LLAMA

IMAGE_ID = TINY_LLAMA["vocab_size"] - 1


def tiny_vlm() -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = build_encoder("clip", config=TINY_CLIP)
    llm = LlamaForCausalLM._from_config(LlamaConfig(**TINY_LLAMA), attn_implementation="sdpa")
    projector = PROJECTORS.build("mlp2x_gelu", TINY_CLIP["hidden_size"], TINY_LLAMA["hidden_size"])
    return VisionLanguageModel(vision, projector, llm, IMAGE_ID)


def test_compile_blocks_compiles_each_decoder_layer_and_vision_block_in_place():
    vlm = tiny_vlm()
    keys = list(vlm.state_dict())
    names = list(outer_blocks(vlm))
    # CLIP keeps its layers up to hidden_states[-2] (2 of 3) and lists its embeddings among its blocks
    vision = ["vision.model.embeddings", "vision.model.encoder.layers.0", "vision.model.encoder.layers.1"]
    assert names == vision + [f"llm.model.layers.{i}" for i in range(TINY_LLAMA["num_hidden_layers"])]
    assert compile_blocks(vlm) == len(names)
    assert compiled_blocks(vlm) == len(names) and compiled_blocks(vlm.projector) == 0
    assert list(vlm.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints and FSDP's names stay


def _steps(optim: OptimConfig, steps: int = 3) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """`steps` AdamW steps of VLMModule's optimizer on one text batch; the trained parameters after them."""
    module = VLMModule(tiny_vlm(), tokenizer=SimpleNamespace(eos_token_id=1), stage="sft", optim=optim)
    optimizer, _ = optimizer_of(module, steps)
    ids = torch.randint(1, IMAGE_ID, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        module.model(ids, torch.ones_like(ids), None, ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


def test_fused_adamw_steps_as_torch_default():
    fused, after_fused = _steps(OptimConfig(lr=1e-2, weight_decay=0.1, fused=True))
    plain, after_plain = _steps(OptimConfig(lr=1e-2, weight_decay=0.1))
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in plain.param_groups)
    for a, b in zip(after_fused, after_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow  # the CPU compile of a decoder layer and a ViT block, forward and backward: ~40 s on 2 cores
def test_compiled_training_follows_eager(tiny_cfg, caplog):
    """`model.compile=true optim.fused=true` through config, Lightning and the fit loop: the eager run's losses
    (packed rows, so the rows vary in number and length), and one console line with the compile time."""
    runs = {}
    for compiled in (False, True):
        cfg = tiny_cfg(
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "data.packing=true",
            "trainable=[encoder,projector,llm]",  # gradients through the compiled vision blocks too
            f"model.compile={compiled}",
            f"optim.fused={compiled}",
        )
        L.seed_everything(cfg.seed, workers=True)
        module = build_module(cfg)
        assert compiled_blocks(module) == (4 if compiled else 0)  # 2 decoder layers + 2 ViT blocks (of 3: to [-2])
        recorder = Losses()
        trainer = build_trainer(cfg, None)
        trainer.callbacks.append(recorder)
        with caplog.at_level(logging.INFO):
            trainer.fit(module, datamodule=build_datamodule(cfg, module.tokenizer))
        runs[compiled] = recorder.losses
    assert len(runs[True]) == 3
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-5)
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model.compile: ")]
    assert len(reports) == 1 and "4 blocks compiled in about" in reports[0]
