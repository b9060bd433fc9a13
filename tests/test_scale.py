"""Scaling out: strategies from the YAML, FSDP wrapping, atomic checkpoints, DDP on CPU = one process."""

from __future__ import annotations

import functools
import os
import signal

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from experiment.assemble import build_module
from experiment.config import ConfigError
from experiment.runner import SIGTERM_EXIT, build_trainer
from experiment.strategy import block_classes, build_strategy
from lit_modules.checkpoint_io import AtomicCheckpointIO
from tests.support.processes import finished_losses, start_sixteen_steps


# ---- strategies from the YAML --------------------------------------------------------------------
def test_strategy_names_and_options_are_validated(tiny_cfg):
    assert tiny_cfg("trainer.strategy=ddp_spawn").trainer.strategy == "ddp_spawn"
    with pytest.raises(ConfigError, match=r"'trainer.strategy' = 'dpp' is not a Lightning strategy.*ddp_spawn"):
        tiny_cfg("trainer.strategy=dpp")
    with pytest.raises(ConfigError, match=r"'trainer.strategy.name' = 'zero' is not valid; choose one of: ddp, fsdp"):
        tiny_cfg("trainer.strategy={name: zero}")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.strategy.shard' for strategy 'fsdp'.*state_dict_type"):
        tiny_cfg("trainer.strategy={name: fsdp, shard: true}")
    with pytest.raises(ConfigError, match=r"'trainer.strategy.state_dict_type' = 'local'.*full, sharded"):
        tiny_cfg("trainer.strategy={name: fsdp, state_dict_type: local}")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.strategy.stage' for strategy 'ddp'"):
        tiny_cfg("trainer.strategy={name: ddp, stage: 2}")


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed installed")
def test_deepspeed_without_the_install_names_the_pip_command(tiny_cfg):
    for spec in ("deepspeed_stage_2", "{name: deepspeed, stage: 3, offload_optimizer: true}"):
        cfg = tiny_cfg(f"trainer.strategy={spec}")  # validates (and --describe works) without the install
        with pytest.raises(ValueError, match="pip install deepspeed"):
            build_trainer(cfg, None)
    with pytest.raises(ConfigError, match="unknown key 'trainer.strategy.shards' for strategy 'deepspeed'"):
        tiny_cfg("trainer.strategy={name: deepspeed, shards: 2}")
    with pytest.raises(ConfigError, match=r"'trainer.strategy.stage' = 4 is not valid; choose one of: 1, 2, 3"):
        tiny_cfg("trainer.strategy={name: deepspeed, stage: 4}")


def test_ddp_mapping_becomes_a_ddp_strategy_with_its_options(tiny_cfg):
    cfg = tiny_cfg(
        "trainer.strategy={name: ddp, find_unused_parameters: true, timeout: 600}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    )
    trainer = build_trainer(cfg, None)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
    assert trainer.strategy._timeout.total_seconds() == 600
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_fsdp_wraps_the_llm_layers_and_vision_blocks(tiny_cfg):
    from timm.models.vision_transformer import Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    module = build_module(tiny_cfg())
    strategy = build_strategy({"name": "fsdp", "state_dict_type": "sharded", "activation_checkpointing": True}, module)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trainable parameters share wrapped units
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer, Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer, Block}
    plain = build_strategy("fsdp", module)  # the plain name gets the same wrapping (Lightning's default fails)
    assert plain.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer, Block}
    assert not plain._activation_checkpointing_kwargs


def test_every_registered_encoder_has_block_classes_holding_most_weights():
    from encoders import build_encoder
    from tests.support.encoder_sizes import FULL_SIZE

    for name, (build_name, kwargs, _) in FULL_SIZE.items():
        with torch.device("meta"):
            encoder = build_encoder(build_name, **kwargs)
        classes = block_classes(encoder)
        in_blocks = sum(p.numel() for m in encoder.modules() if type(m) in classes for p in m.parameters())
        total = sum(p.numel() for p in encoder.parameters())
        assert in_blocks / total > 0.8, (name, classes, in_blocks / total)


def test_wrapped_parameter_names_match_the_state_dict(tiny_cfg):
    """The names VLMModule.on_save_checkpoint uses to drop frozen weights stay the state-dict keys when
    blocks are wrapped. Activation checkpointing's wrapper (what FSDP's `activation_checkpointing`
    applies) runs on CPU; FSDP itself needs a GPU in torch 2.15 ("FSDP needs a non-CPU accelerator")."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    module = build_module(tiny_cfg("stage=align", "trainable=null"))
    plain = {n for ps in module.model.parts().values() for n, _ in ps}
    classes = block_classes(module.model)
    apply_activation_checkpointing(module.model, check_fn=lambda m: type(m) in classes)
    assert any("_checkpoint_wrapped_module" in n for n, _ in module.model.named_parameters())
    assert {n for ps in module.model.parts().values() for n, _ in ps} == plain
    state = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(state)
    assert not any(k.startswith("model.llm.") for k in state["state_dict"])
    assert any(k.startswith("model.projector.") for k in state["state_dict"])


def test_sharded_fsdp_checkpoints_keep_frozen_weights_and_load_without_state_dict(tiny_cfg):
    module = build_module(tiny_cfg("stage=align", "trainable=null"))
    state = {"state_dict": dict(module.state_dict())}

    class Sharded:  # what VLMModule reads from Lightning's FSDPStrategy(state_dict_type="sharded")
        _state_dict_type = "sharded"

    module._trainer = type("T", (), {"strategy": Sharded()})()
    module.on_save_checkpoint(state)
    assert set(state["state_dict"]) == set(module.state_dict())  # torch.distributed.checkpoint needs every key
    module.on_load_checkpoint({"epoch": 0})  # FSDP / DeepSpeed pop "state_dict" before the hook runs
    module._trainer = None
    module.on_save_checkpoint(state)
    assert not any(k.startswith("model.llm.") for k in state["state_dict"])  # files still drop the frozen LLM


def test_fsdp_clips_gradients_by_their_norm_over_all_shards():
    """Lightning's FSDP precision plugin refuses norm clipping: every FSDP run with `gradient_clip_val` (base.yaml
    sets 1.0) failed at its first step on an H100. VLMModule clips through the root FSDP module instead; the
    clipped gradients equal torch's clip_grad_norm_ on an unwrapped copy (FSDP on CPU, one gloo process)."""
    import copy
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lit_modules.vlm_module import VLMModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    reference = copy.deepcopy(net)
    x = torch.randn(4, 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = FSDP(net, device_id=torch.device("cpu"), use_orig_params=True)
        (wrapped(x) ** 2).sum().backward()
        (reference(x) ** 2).sum().backward()
        module = type("M", (), {"_trainer": type("T", (), {"strategy": type("S", (), {"model": wrapped})()})()})()
        VLMModule.configure_gradient_clipping(module, None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        for (name, p), q in zip(wrapped.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in wrapped.parameters()])) <= 0.5 + 1e-6
    finally:
        dist.destroy_process_group()


# ---- atomic checkpoints --------------------------------------------------------------------------
def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_cfg, monkeypatch):
    from tests.support.runs import fit

    trainer = fit(tiny_cfg("trainer.max_steps=2", "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=2"))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    ckpt_dir = os.path.join(trainer.logger.log_dir, "checkpoints")
    last = os.path.join(ckpt_dir, "last.ckpt")
    before = open(last, "rb").read()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):  # half the bytes reach the file, then the job dies
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(f.tell() // 2 + 100)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(last)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(last, "rb").read() == before
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert os.listdir(ckpt_dir) == ["last.ckpt"]  # no temporary file left behind

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        trainer.save_checkpoint(last)  # the bytes are written, but never replace the old file unsynced
    assert open(last, "rb").read() == before and os.listdir(ckpt_dir) == ["last.ckpt"]


# ---- DDP on CPU ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(shapes_root, tmp_path_factory):
    """The one-process runs (global batch 8) the DDP runs are compared with, started at most once per grouping
    for the module: `one_process(group_by_length)` starts it (beside the DDP run the test starts next) and
    returns a function giving its train/loss {step: value} once it has ended."""
    root, runs = tmp_path_factory.mktemp("one_process"), {}

    def start(group_by_length: bool):
        version = "one_grouped" if group_by_length else "one"
        if version not in runs:
            grouping = f"data.group_by_length={group_by_length}"
            proc = start_sixteen_steps(root, shapes_root, version, grouping, "trainer.devices=1", "data.batch_size=8")
            runs[version] = functools.cache(lambda: finished_losses(root, proc, version))
        return runs[version]

    return start


@pytest.mark.slow
@pytest.mark.parametrize("group_by_length", [False, True])
def test_ddp_two_cpu_processes_match_one_process(one_process, shapes_root, tmp_path, group_by_length):
    # Same global batch (8): one process x 8 vs two gloo processes x 4, over 16 steps. The 51 training
    # samples make 7 steps an epoch whose last global batch has 3 samples (DDP pads rank 1 with a repeat
    # that scores nothing), so steps 6 and 13 are padded last batches and steps 7 and 14 start new epochs.
    # With grouping, some global batches are text-only (no image gradient in one process).
    grouping = f"data.group_by_length={group_by_length}"
    one = one_process(group_by_length)
    two = start_sixteen_steps(
        tmp_path, shapes_root, "two", grouping, "trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=4"
    )
    one, two = one(), finished_losses(tmp_path, two, "two")
    assert sorted(one) == sorted(two) == list(range(16))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-6), (step, one, two)


@pytest.mark.slow
def test_sigterm_under_ddp_saves_and_resumes_exactly(one_process, shapes_root, tmp_path):
    """SLURM pre-emption of a 2-process DDP job: every process gets SIGTERM. Rank 0's flag reaches all ranks
    (Lightning broadcasts it each step), they stop after the same step, last.ckpt is saved, the job exits 143,
    and `resume=auto` (DDP again) logs the losses of an uninterrupted one-process run."""
    from tests.support.processes import kill_after_checkpoint

    ddp = ("trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=4")
    one = one_process(False)  # the ungrouped reference of the test above, when it ran
    two = start_sixteen_steps(tmp_path, shapes_root, "two", *ddp, "checkpoint.every_n_train_steps=3")
    last = tmp_path / "runs" / "quickstart" / "two" / "checkpoints" / "last.ckpt"
    stopped = kill_after_checkpoint(two, str(last), sig=signal.SIGTERM)
    assert two.returncode == SIGTERM_EXIT and stopped >= 3, two.output[-4000:]
    again = start_sixteen_steps(tmp_path, shapes_root, "two", *ddp, "resume=auto")
    one, two = one(), finished_losses(tmp_path, again, "two")
    assert sorted(one) == list(range(16)) and set(range(3, 16)) <= set(two)
    for step in range(3, 16):
        assert two[step] == pytest.approx(one[step], rel=2e-6), (step, one, two)


def test_ranks_split_each_global_batch(shapes_root, tokenizer):
    from datamodules.sampler import GroupedSampler

    lengths, images = list(range(48)), [True] * 48
    whole = list(GroupedSampler(lengths, images, batch_size=8, seed=3))
    ranks = [list(GroupedSampler(lengths, images, batch_size=4, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    for k in range(6):  # global batch k = rank 0's k-th batch + rank 1's k-th batch
        assert sorted(ranks[0][4 * k : 4 * k + 4] + ranks[1][4 * k : 4 * k + 4]) == sorted(whole[8 * k : 8 * k + 8])
        assert ranks[1][4 * k : 4 * k + 4] == whole[8 * k + 1 : 8 * k + 8 : 2]


def test_ranks_pad_the_last_global_batch_with_repeats_that_score_nothing():
    from datamodules.sampler import GroupedSampler, Padding, ZeroWeightPadding

    lengths, images = list(range(51)), [True] * 51
    for group in (False, True):
        for epoch in (0, 1):
            whole = GroupedSampler(lengths, images, batch_size=8, seed=3, group_by_length=group)
            ranks = [
                GroupedSampler(lengths, images, batch_size=4, seed=3, group_by_length=group, num_replicas=2, rank=r)
                for r in (0, 1)
            ]
            for s in (whole, *ranks):
                s.set_epoch(epoch)
            whole, (r0, r1) = list(whole), [list(r) for r in ranks]
            assert len(r0) == len(r1) == 26 and len(whole) == 51
            assert [i for k in range(26) for i in (r0[k], r1[k])][:51] == whole  # same global batches, same order
            assert isinstance(r1[-1], Padding) and not any(isinstance(i, Padding) for i in r0 + r1[:-1])

    dataset = ZeroWeightPadding([{"labels": [-100, 5, 6]}, None])
    assert dataset[0]["labels"] == [-100, 5, 6] and dataset[Padding(0)]["labels"] == [-100, -100, -100]
    assert dataset[Padding(1)] is None


@pytest.mark.slow
def test_ddp_keeps_stepping_through_unreadable_images(shapes_root, tmp_path):
    """Every image unreadable (on_error=skip), batches grouped by modality: whole per-rank batches are
    stand-ins that score nothing, and both ranks keep stepping in lockstep (no hang, no crash)."""
    import json
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(shapes_root, "images"), folder / "images")
    for image in os.listdir(folder / "images"):
        (folder / "images" / image).write_bytes(b"not an image")
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))
    (tmp_path / "train.json").write_text(json.dumps(records))
    data = [
        "data.builtin=null",
        f"data.train_json={tmp_path / 'train.json'}",
        f"data.image_folder={folder}",
        f"model.tokenizer={shapes_root}/tokenizer",
        "data.on_error=skip",
        "data.group_by_length=true",
    ]
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=6"]
    losses = finished_losses(tmp_path, start_sixteen_steps(tmp_path, shapes_root, "skip", *data, *ddp), "skip")
    assert sorted(losses) == list(range(6))
    assert set(losses.values()) == {0.0}  # stand-ins only: no signal, no NaN
