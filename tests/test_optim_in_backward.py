"""`optim.in_backward` (lit_modules/optim_in_backward.py): AdamW stepped inside backward follows torch's AdamW on the
normal path, step for step (losses, parameters, optimizer state, the lr of each part), through a checkpoint and a
resume; the configurations where it cannot be correct are refused in one line naming the option."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from experiment.assemble import build_module
from foundation.schema import ConfigError
from lit_modules.optim_in_backward import AdamWInBackward
from tests.support.events import scalars
from tests.support.optim import FIT, NO_CLIP, OPTIM, SaveAt, image_and_text_batches, optimizer_of, train
from tests.support.runs import LossRecorder, fit


@pytest.mark.parametrize("fused", [False, True])
def test_in_backward_steps_as_adamw_and_its_state_is_adamws(tiny_cfg, fused):
    """The optimizer alone, on the tiny quickstart model: the same parameters and the same `state_dict` as torch's
    default AdamW after an image batch and a text-only one, with the single-tensor kernel or the fused one; the
    state loaded into a fresh one continues identically."""
    modules, optimizers = {}, {}
    for in_backward in (False, True):
        cfg = tiny_cfg(*OPTIM, NO_CLIP, f"optim.in_backward={in_backward}", f"optim.fused={fused and in_backward}")
        L.seed_everything(0)
        modules[in_backward] = module = build_module(cfg)
        optimizers[in_backward] = optimizer_of(module, steps=6)
        assert isinstance(optimizers[in_backward][0], AdamWInBackward) == in_backward
    batches = image_and_text_batches(modules[True].model)
    for in_backward, module in modules.items():
        train(module, *optimizers[in_backward], batches[:2], in_backward)
    plain, ours = (optimizers[k][0].state_dict() for k in (False, True))
    kernel = {"fused": None, "foreach": None}  # the kernel is the only setting that differs
    assert [{**g, **kernel} for g in plain["param_groups"]] == [{**g, **kernel} for g in ours["param_groups"]]
    assert plain["state"].keys() == ours["state"].keys() == set(range(len(plain["state"])))
    for index, state in plain["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][index][key], value, rtol=1e-5, atol=1e-7)

    # a resume: the in-backward state (and the scheduler's) into a fresh optimizer over a copy of the weights
    resumed = build_module(tiny_cfg(*OPTIM, NO_CLIP, "optim.in_backward=true", f"optim.fused={fused}"))
    resumed.model.load_state_dict(modules[True].model.state_dict())
    optimizer, scheduler = optimizer_of(resumed, steps=6)
    # deep copies, as from a checkpoint file: load_state_dict keeps the very tensors it is given
    optimizer.load_state_dict(copy.deepcopy(optimizers[True][0].state_dict()))
    scheduler.load_state_dict(copy.deepcopy(optimizers[True][1].state_dict()))
    train(resumed, optimizer, scheduler, batches[2:], in_backward=True)
    for in_backward, module in modules.items():
        train(module, *optimizers[in_backward], batches[2:], in_backward)
    trained = dict(modules[False].model.named_parameters())
    for model in (modules[True].model, resumed.model):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p, trained[name], rtol=1e-5, atol=1e-6, msg=name)
    optimizers[True][0].remove_hooks()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_fit_in_backward_follows_the_normal_fit_and_resumes_exactly(tiny_cfg, tmp_path, precision):
    """train.py's own path (experiment.runner.run), in fp32 and under bf16 autocast (its losses differ from fp32's
    from the first step): the same losses, parameters and logged lr per part as the normal fit; resumed from its
    step-2 checkpoint, the same steps again; the checkpoint's optimizer state is the normal run's."""
    runs = {}
    for name, extra in (("plain", ()), ("in_backward", ("optim.in_backward=true",)), ("resumed", None)):
        if extra is None:
            extra = ("optim.in_backward=true", f"resume={runs['in_backward']['checkpoint']}")
        checkpoint = str(tmp_path / f"{name}-step2.ckpt")
        cfg = tiny_cfg(*OPTIM, *FIT, NO_CLIP, *extra, f"trainer.precision={precision}", f"logging.run_name={name}")
        losses = LossRecorder()
        trainer = fit(cfg, losses, SaveAt(2, checkpoint))
        run_dir = os.path.join(cfg.logging.root, cfg.name, name)
        runs[name] = {
            "losses": losses.losses,
            "params": {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters()},
            "lr": {part: scalars(run_dir, f"lr/{part}") for part in ("encoder", "projector", "llm")},
            "checkpoint": checkpoint,
        }
    plain, ours, resumed = runs["plain"], runs["in_backward"], runs["resumed"]
    assert sorted(plain["losses"]) == sorted(ours["losses"]) == [1, 2, 3, 4]
    assert ours["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-7)
    assert sorted(resumed["losses"]) == [3, 4]
    assert resumed["losses"] == pytest.approx({s: ours["losses"][s] for s in (3, 4)}, rel=1e-6, abs=1e-7)
    for name, p in plain["params"].items():
        torch.testing.assert_close(ours["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(resumed["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    # warm-up over 2 steps, then the cosine: each part at its own peak rate (encoder at optim.lr)
    assert ours["lr"] == plain["lr"] and plain["lr"]["projector"][1] == pytest.approx(0.005)
    assert resumed["lr"]["llm"][3] == plain["lr"]["llm"][3]
    saved = [
        torch.load(runs[k]["checkpoint"], weights_only=False)["optimizer_states"][0] for k in ("plain", "in_backward")
    ]
    assert saved[0]["param_groups"] == saved[1]["param_groups"]
    for index, state in saved[0]["state"].items():
        torch.testing.assert_close(saved[1]["state"][index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
        ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
        ("trainer.devices=2", "devices = 2"),
        ("trainer.strategy=ddp", "trainer.strategy = ddp"),
        ("trainer.strategy={name: fsdp}", "trainer.strategy = fsdp"),
        ("trainer.num_nodes=2", "num_nodes = 2"),
        ("trainer.precision=16-mixed", "trainer.precision = 16-mixed"),
    ],
)
def test_what_needs_every_gradient_before_a_step_is_refused(tiny_cfg, override, named):
    extra = () if override.startswith("trainer.gradient_clip_val") else (NO_CLIP,)
    with pytest.raises(ConfigError) as refused:
        tiny_cfg("optim.in_backward=true", *extra, override)
    line = str(refused.value)
    assert "\n" not in line and "'optim.in_backward'" in line and named in line, line


def test_a_run_that_gets_several_devices_anyway_is_refused(tiny_cfg):
    """devices: auto on a machine with several GPUs gives DDP: the module refuses it when it builds the optimizer."""
    module = build_module(tiny_cfg("optim.in_backward=true", NO_CLIP))
    module.trainer = SimpleNamespace(estimated_stepping_batches=4, strategy=DDPStrategy())
    with pytest.raises(ConfigError, match="'optim.in_backward' runs on one device only, but the run got DDPStrategy"):
        module.configure_optimizers()
