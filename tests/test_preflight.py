"""Config and file errors arrive before anything is built, name the key, and checkpoints cannot run code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from experiment.config import ConfigError
from experiment.runner import run
from inference.load import load_module
from lit_modules.checkpoint_io import CheckpointError


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.encoder.image_size=abc", "'model.encoder.image_size' = 'abc' is not valid; it must be int | None"),
        ("model.encoder.select_layer=1.5", "'model.encoder.select_layer' = 1.5 is not valid; it must be int"),
        ("model.enhancer={name: dual_perspective, n: three}", "'model.enhancer.n' = 'three' is not valid"),
        ("trainer.max_steps=abc", "'trainer.max_steps' = 'abc' is not valid; it must be int"),
        ("trainer.precision=bf17", "'trainer.precision' = 'bf17' is not valid"),
        ("trainer.logger=false", "'trainer.logger' is set by the runner"),
        ("data.batch_size=0", "'data.batch_size' = 0 is not valid; it must be >= 1"),
        ("data.max_length=-5", "'data.max_length' = -5 is not valid"),
        ("optim.lr=-1", "'optim.lr' = -1.0 is not valid; it must be >= 0"),
        ("optim.lr_per_part={llm: -0.1}", "'optim.lr_per_part.llm' = -0.1 is not valid"),
        ("optim.betas=[0.9]", "'optim.betas' = [0.9] is not valid; it must be two numbers in [0, 1)"),
        ("optim.warmup_ratio=2", "'optim.warmup_ratio' = 2.0 is not valid"),
        ("checkpoint.every_n_train_steps=0", "'checkpoint.every_n_train_steps' = 0 is not valid"),
    ],
)
def test_bad_values_fail_when_the_config_loads(tiny_cfg, override, needle):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(override)
    assert needle in str(err.value)


def test_values_that_fit_pass(tiny_cfg):
    cfg = tiny_cfg("trainer.precision=bf16-mixed", "trainer.val_check_interval=0.5", "trainer.devices=[0]")
    assert cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "data.train_json={tmp}/nowhere.json",
            "'data.train_json' = '{tmp}/nowhere.json': training data file not found",
        ),
        ("data.image_folder={tmp}/images", "'data.image_folder' = '{tmp}/images': image folder not found"),
        ("model.tokenizer=checkpoints/vicuna-7b/tokenizer", "'model.tokenizer' = 'checkpoints/vicuna-7b/tokenizer'"),
        ("model.encoder.checkpoint={tmp}/vit.safetensors", "'model.encoder.checkpoint' = '{tmp}/vit.safetensors'"),
        ("init_from={tmp}/align.ckpt", "'init_from' = '{tmp}/align.ckpt': checkpoint not found"),
        ("resume={tmp}/last.ckpt", "'resume' = '{tmp}/last.ckpt': checkpoint not found"),
    ],
)
def test_missing_files_fail_before_building_anything(tiny_cfg, shapes_root, tmp_path, override, needle):
    files = [
        "data.builtin=null",
        f"data.train_json={shapes_root}/sft_train.json",
        f"data.image_folder={shapes_root}",
        f"model.tokenizer={shapes_root}/tokenizer",
    ]
    cfg = tiny_cfg(*files, override.format(tmp=tmp_path))
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert needle.format(tmp=tmp_path) in str(err.value) and "Repo id" not in str(err.value)
    assert not os.path.exists(cfg.logging.root)  # no run directory was created


class _Payload:
    """What a crafted checkpoint carries: unpickling it would write a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save(
            {"state_dict": {}, "hyper_parameters": {"config": {}}, "x": _Payload(str(marker))}, f, pickle_module=pickle
        )
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.ckpt: refused: it holds objects other than tensors"):
        load_module(str(path))  # also what init_from and tools/merge_lora read checkpoints with
    assert not marker.exists()


def test_an_explicit_run_name_never_shares_a_run_directory(tiny_cfg):
    short = ("trainer.max_epochs=3", "trainer.limit_val_batches=0")
    first = run(tiny_cfg("logging.run_name=mine", "trainer.max_steps=1", *short))
    assert first.global_step == 1
    with pytest.raises(ConfigError, match="'logging.run_name' = 'mine': .*mine already holds a run"):
        run(tiny_cfg("logging.run_name=mine", "trainer.max_steps=2", *short))
    again = run(tiny_cfg("logging.run_name=mine", "resume=auto", "trainer.max_steps=2", "optim.extend=cosine", *short))
    assert again.global_step == 2 and again.logger.version == "mine"
