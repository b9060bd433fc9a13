"""INF-LLaVA wired into the training path: n*S px images in training and evaluation, DEM weights in
every checkpoint, and its stage-1 mm_projector.bin loading through the config."""

from __future__ import annotations

import os

import torch

from encoders.inf_llava import DualPerspective
from experiment.assemble import build_datamodule, build_module
from experiment.config import EXPERIMENTS_DIR
from tests.support.runs import fit

INF_QUICKSTART = os.path.join(EXPERIMENTS_DIR, "inf_llava", "quickstart.yaml")


def test_quickstart_fits_and_checkpoints_keep_the_dem(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "checkpoint.every_n_train_steps=1",
        "stage=align",
        "trainable=null",
        "data.template=null",
        path=INF_QUICKSTART,
    )
    module = build_module(cfg)
    vision = module.model.vision
    assert isinstance(vision, DualPerspective) and vision.image_size == 3 * 32
    dm = build_datamodule(cfg)  # reads the input size from a meta-device build: no second set of weights
    dm.setup()
    assert next(iter(dm.val_dataloader()))["pixel_values"].shape[-1] == 96  # n*S in evaluation too
    before = {n: p.detach().clone() for n, p in vision.dem.named_parameters()}
    trainer = fit(cfg)
    state = torch.load(os.path.join(trainer.logger.log_dir, "checkpoints", "last.ckpt"), weights_only=False)
    dem_keys = [k for k in state["state_dict"] if k.startswith("model.vision.dem.")]
    assert "model.vision.dem.attention.linears.0.weight" in dem_keys and "model.vision.dem.ln_fuse.weight" in dem_keys
    trained = trainer.lightning_module.model.vision.dem
    assert any(not torch.equal(before[n], p) for n, p in trained.named_parameters())  # the DEM trained
    assert not any(
        k.startswith("model.vision.inner.") for k in state["state_dict"] if "weight" in k
    )  # the frozen encoder is not saved in stage 1


def test_mm_projector_bin_loads_dem_and_projector(tiny_cfg, tmp_path):
    cfg = tiny_cfg(path=INF_QUICKSTART)
    module = build_module(cfg)
    dem = module.model.vision.dem.state_dict()
    proj = module.model.projector.state_dict()
    release = {f"model.spatial_embed.{k}": torch.randn_like(v) for k, v in dem.items()}
    release |= {f"model.mm_projector.{k}": torch.randn_like(v) for k, v in proj.items()}
    torch.save(release, tmp_path / "mm_projector.bin")
    loaded = build_module(tiny_cfg(f"model.mm_projector={tmp_path / 'mm_projector.bin'}", path=INF_QUICKSTART))
    for k, v in loaded.model.vision.dem.state_dict().items():
        assert torch.equal(v, release[f"model.spatial_embed.{k}"])
    for k, v in loaded.model.projector.state_dict().items():
        assert torch.equal(v, release[f"model.mm_projector.{k}"])
