"""The optimizer tests' shared pieces (tests/test_optim_in_backward.py, tests/test_optim_states.py): the settings each
per-parameter step must get right, the optimizer VLMModule builds outside a Trainer, batches with and without an
image, the normal path's step, and a full checkpoint at a given step."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

# different rates per part, warm-up then cosine, weight decay: what the per-parameter steps must each get right
OPTIM = ("optim.lr_per_part={projector: 0.01, llm: 0.003}", "optim.warmup_ratio=0.5", "optim.weight_decay=0.1")
FIT = ("trainer.max_steps=4", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1")
NO_CLIP = "trainer.gradient_clip_val=null"  # base.yaml clips by norm, which in_backward refuses


def optimizer_of(module, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and scheduler `module.configure_optimizers` builds for `steps` steps on one device."""
    module.trainer = SimpleNamespace(  # what configure_optimizers reads
        estimated_stepping_batches=steps, strategy=SingleDeviceStrategy(torch.device("cpu"))
    )
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def image_and_text_batches(model) -> list[tuple]:
    """An image batch, then a text-only one (the vision path gets no gradient: it steps with a zero one)."""
    gen = torch.Generator().manual_seed(0)
    image_id, (h, w), size = model.image_token_id, model.vision.grid_size, model.vision.image_size
    ids = torch.randint(1, image_id, (2, h * w + 8), generator=gen)
    with_image = ids.clone()
    with_image[:, 1 : 1 + h * w] = image_id  # one image token per patch of the tower's grid
    pixels = torch.randn(2, 3, size, size, generator=gen)
    return [(with_image, pixels), (ids, None), (with_image, pixels)]


def train(module, optimizer, scheduler, steps: list[tuple], in_backward: bool) -> None:
    """The normal path's steps (or, `in_backward`, what is left of them after backward) over `steps`' batches."""
    for ids, pixels in steps:
        module.model(ids, torch.ones_like(ids), pixels, ids).loss.backward()
        if not in_backward:  # VLMModule.on_before_optimizer_step on one device: every parameter steps
            for p in (p for g in optimizer.param_groups for p in g["params"] if p.grad is None):
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


class SaveAt(L.Callback):
    """A full checkpoint (optimizer, scheduler, loops) after step `step`, as LastCheckpoint writes one."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path, weights_only=False)
