"""End to end on the shrunk quickstart: fit, TensorBoard contents, checkpoints, exact resume, init_from."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train import build_datamodule, build_model, build_trainer, main, resolve_resume


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class Crash(L.Callback):
    """Dies before step `at` + 1 starts, like a killed job: the newest checkpoint is the step-`at` one."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def fit(cfg, resume=None, *callbacks) -> L.Trainer:
    L.seed_everything(cfg.seed, workers=True)
    module = build_model(cfg)
    trainer = build_trainer(cfg, resume)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=build_datamodule(cfg, module), ckpt_path=resume)
    return trainer


def test_quickstart_fit_logs_everything(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.max_steps=12", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3"
    )
    trainer = main_with(cfg, tmp_path)
    run = trainer.logger.log_dir
    assert yaml.safe_load(open(os.path.join(run, "config.yaml")))["name"] == "quickstart"
    ea = EventAccumulator(run, size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in (
        "train/loss",
        "val/loss",
        "val/exact_match",
        "hparams/val_exact_match",
        "hparams/val_loss",
        "train/device/samples_per_sec",
        "train/device/items_per_sec",
    ):
        assert tag in scalars, (tag, " ".join(sorted(scalars)))
    assert any(t.startswith("lr-AdamW") for t in scalars)
    assert "val/images" in ea.Tags()["images"]
    assert "val/samples/text_summary" in ea.Tags()["tensors"]
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))
    ckpts = os.listdir(os.path.join(run, "checkpoints"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)


def main_with(cfg, tmp_path) -> L.Trainer:
    """train.main on an already-composed config (the CLI path is covered by test_cli_overrides)."""
    from omegaconf import OmegaConf

    path = tmp_path / "exp.yaml"
    OmegaConf.save(cfg, path)
    (tmp_path / "exp.yaml").write_text("# python train.py exp.yaml\n" + path.read_text())
    return main([str(path)])


def test_resume_mid_epoch_matches_uninterrupted_run(tiny_cfg):
    common = (
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=0",
        "checkpoint.every_n_train_steps=2",
        "optim.lr=0.01",
    )
    full = LossRecorder()
    fit(tiny_cfg(*common, "trainer.max_steps=10", "logging.version=full"), None, full)
    # An interrupted run dies after 4 of its ~7 batches per epoch, then `resume=auto` continues it.
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_cfg(*common, "trainer.max_steps=10", "logging.version=cut"), None, Crash(at=4))
    cfg = tiny_cfg(*common, "trainer.max_steps=10", "resume=auto")
    resume = resolve_resume(cfg)
    assert resume.endswith(os.path.join("cut", "checkpoints", "last.ckpt"))
    resumed = LossRecorder()
    trainer = fit(cfg, resume, resumed)
    assert trainer.global_step == 10 and trainer.logger.version == "cut"  # same run directory, curves continue
    assert sorted(resumed.losses) == list(range(5, 11))
    for step in range(5, 11):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), step


def test_init_from_loads_alignment_weights(tiny_cfg, tmp_path):
    align = fit(
        tiny_cfg(
            "stage=align",
            "trainable=null",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "data.template=null",
            "logging.version=align",
            "checkpoint.every_n_train_steps=2",
        )
    )
    ckpt = os.path.join(align.logger.log_dir, "checkpoints", "last.ckpt")
    state = torch.load(ckpt, weights_only=False)
    assert {k.split(".")[1] for k in state["state_dict"] if "projector" in k} == {"projector"}
    assert not any(k.startswith("model.llm.") and "weight" in k for k in state["state_dict"])  # frozen LLM not saved
    cfg = tiny_cfg(f"init_from={ckpt}", "trainer.max_steps=1", "trainer.limit_val_batches=0", "logging.version=sft")
    module = build_model(cfg)
    module.load_state_dict(state["state_dict"], strict=False)
    w = state["state_dict"]["model.projector.0.weight"]
    assert torch.equal(module.model.projector[0].weight, w)


def test_cli_overrides(shapes_root, tmp_path):
    from tests.conftest import tiny_overrides

    trainer = main(
        tiny_overrides(shapes_root, str(tmp_path / "runs")) + ["trainer.max_steps=1", "trainer.limit_val_batches=1"]
    )
    assert trainer.global_step == 1
    assert glob.glob(str(tmp_path / "runs" / "quickstart" / "version_0" / "config.yaml"))


def test_skipped_records_are_counted_in_tensorboard(tiny_cfg, shapes_root, tmp_path):
    import json

    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))[:16]
    records.append({"id": "broken", "image": "images/missing.png", "conversations": records[0]["conversations"]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    cfg = tiny_cfg(
        "data.builtin=null",
        f"data.train_json={path}",
        f"data.image_folder={shapes_root}",
        f"model.tokenizer={shapes_root}/tokenizer",
        "data.val_fraction=0.25",
        "data.on_error=skip",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=1",
    )
    trainer = fit(cfg)
    ea = EventAccumulator(trainer.logger.log_dir)
    ea.Reload()
    assert [e.value for e in ea.Scalars("data/skipped_records")] == [1.0]
