"""End to end on the shrunk quickstart: fit, TensorBoard contents, checkpoints, exact resume, init_from."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from types import MappingProxyType

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from experiment.assemble import build_module
from experiment.config import load_config
from experiment.runner import resolve_resume
from inference.load import load_module
from tests.support.events import scalars
from tests.support.paths import REPO
from tests.support.processes import run_script
from tests.support.quickstart import tiny_overrides
from tests.support.runs import LossRecorder, fit, run_script_here


class Crash(L.Callback):
    """Dies before step `at` + 1 starts, like a killed job: the newest checkpoint is the step-`at` one."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_quickstart_fit_logs_everything(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.max_steps=12", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3"
    )
    trainer = fit(cfg)
    run = trainer.logger.log_dir
    assert yaml.safe_load(open(os.path.join(run, "config.yaml")))["name"] == "quickstart"
    ea = EventAccumulator(run, size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "train/loss",
        "val/loss",
        "val/exact_match",
        "hparams/val_exact_match",
        "hparams/val_loss",
        "throughput/device/samples_per_sec",
        "throughput/device/items_per_sec",
    ):
        assert tag in tags, (tag, " ".join(sorted(tags)))
    assert {"lr/encoder", "lr/projector", "lr/llm"} <= tags and not any(t.startswith("lr-AdamW") for t in tags)
    assert {"val/sample_0", "val/sample_1"} <= set(ea.Tags()["images"])
    assert "custom_scalars__config__" in ea.Tags()["tensors"]  # the CUSTOM SCALARS layout
    # HPARAMS: the settings that decide a comparison and the command-line overrides, metric names only
    # (hparams/* scalars are real validation values: no placeholder point at step 0)
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {k: v.string_value or v.number_value for k, v in start.session_start_info.hparams.items()}
    assert hparams["encoder"] == "timm:vit_tiny_patch16_224" and hparams["image_tokens"] == 16
    assert hparams["trainable"] == "encoder,projector,llm" and hparams["override/trainer.val_check_interval"] == "3"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"hparams/val_exact_match", "hparams/val_loss"}
    assert 0 not in [e.step for e in ea.Scalars("hparams/val_loss")]
    assert "val/samples/text_summary" in ea.Tags()["tensors"]
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))
    ckpts = os.listdir(os.path.join(run, "checkpoints"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)


def test_resume_mid_epoch_matches_uninterrupted_run(tiny_cfg):
    common = (
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=0",
        "checkpoint.every_n_train_steps=2",
        "optim.lr=0.01",
    )
    full = LossRecorder()
    fit(tiny_cfg(*common, "trainer.max_steps=10", "logging.run_name=full"), full)
    # An interrupted run dies after 4 of its ~7 batches per epoch, then `resume=auto` continues it.
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_cfg(*common, "trainer.max_steps=10", "logging.run_name=cut"), Crash(at=4))
    cfg = tiny_cfg(*common, "trainer.max_steps=10", "resume=auto")
    resume = resolve_resume(cfg)
    assert resume.endswith(os.path.join("cut", "checkpoints", "last.ckpt"))
    resumed = LossRecorder()
    trainer = fit(cfg, resumed)
    assert trainer.global_step == 10 and trainer.logger.version == "cut"  # same run directory, curves continue
    assert sorted(resumed.losses) == list(range(5, 11))
    for step in range(5, 11):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), step


# Constant lr (the schedule's length is then the only thing a longer max_steps changes), 6 batches an epoch
CONSTANT_LR = ("trainer.max_epochs=3", "trainer.limit_val_batches=0", "optim.lr=0.01", "optim.warmup_ratio=0",
               "optim.min_lr_ratio=1.0")  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory) -> MappingProxyType:
    """train/loss of each step of one uninterrupted 9-step run at CONSTANT_LR: the reference of the tests below
    that stop a run and continue it, trained once for them."""
    runs = str(tmp_path_factory.mktemp("runs"))
    full = LossRecorder()
    fit(load_config(None, [*tiny_overrides(shapes_root, runs), *CONSTANT_LR, "trainer.max_steps=9"]), full)
    return MappingProxyType(full.losses)


def test_a_run_stopped_by_max_steps_continues_inside_its_epoch(tiny_cfg, uninterrupted):
    """Stopped at step 4 of a 6-batch epoch, then continued with a larger max_steps: steps 5-6 take the
    rest of that epoch's batches, as one uninterrupted run does."""
    fit(tiny_cfg(*CONSTANT_LR, "trainer.max_steps=4", "logging.run_name=short"))
    longer = LossRecorder()
    trainer = fit(tiny_cfg(*CONSTANT_LR, "trainer.max_steps=9", "logging.run_name=short", "resume=auto"), longer)
    assert trainer.global_step == 9 and sorted(longer.losses) == list(range(5, 10))
    for step in range(5, 10):
        assert longer.losses[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_a_strategy_that_restores_after_its_setup_resumes_mid_epoch_exactly(tiny_cfg, monkeypatch, uninterrupted):
    """FSDP and DeepSpeed restore a checkpoint after their setup, where configure_optimizers'
    estimated_stepping_batches has already built the training loader; its sampler must still take the
    checkpoint's position. Both resumed at the epoch's first batch on an H100 (bench/gpu_round_trips.py).
    Here the single-device strategy restores the same way, with DataLoader workers (they draw their first
    indices as soon as that early loader's iterator exists); the reference is the uninterrupted run without
    workers, which load the same samples."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    monkeypatch.setattr(SingleDeviceStrategy, "restore_checkpoint_after_setup", property(lambda self: True))
    fit(tiny_cfg(*CONSTANT_LR, "data.num_workers=2", "trainer.max_steps=4", "logging.run_name=short"))
    resumed = LossRecorder()
    fit(tiny_cfg(*CONSTANT_LR, "data.num_workers=2", "trainer.max_steps=9", "logging.run_name=short", "resume=auto"),
        resumed)  # fmt: skip
    assert sorted(resumed.losses) == list(range(5, 10))
    for step in range(5, 10):
        assert resumed.losses[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_the_progress_bar_leaves_out_the_run_name(tiny_cfg):
    """Lightning's bars show the logger version cut to 4 characters ("v_num: ults" for "defaults")."""
    from lit_modules.callbacks.console import RichBar, TQDMBar

    trainer = fit(tiny_cfg("trainer.enable_progress_bar=true", "trainer.max_steps=1", "trainer.limit_val_batches=0"))
    bar = trainer.progress_bar_callback
    assert isinstance(bar, (RichBar, TQDMBar)) and [c for c in trainer.callbacks if c is bar] == [bar]
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert "v_num" not in shown and "train/loss" in shown, shown


def train_cli(*args: str) -> subprocess.CompletedProcess:
    """`python train.py args...` as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_init_from_on_the_command_line_and_load_module(tiny_cfg, shapes_root, tmp_path):
    align = fit(
        tiny_cfg(
            "stage=align",
            "trainable=null",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "data.template=null",
            "logging.run_name=align",
            "checkpoint.every_n_train_steps=2",
        )
    )
    ckpt = os.path.join(align.logger.log_dir, "checkpoints", "last.ckpt")
    state = torch.load(ckpt, weights_only=True)
    assert {k.split(".")[1] for k in state["state_dict"] if "projector" in k} == {"projector"}
    assert not any(k.startswith("model.llm.") and "weight" in k for k in state["state_dict"])  # frozen LLM not saved
    # The documented loader rebuilds the trained module from the checkpoint alone.
    loaded = load_module(ckpt)
    assert torch.equal(loaded.model.projector[0].weight, state["state_dict"]["model.projector.0.weight"])
    assert loaded.model.projector[0].weight.requires_grad and not loaded.model.llm.lm_head.weight.requires_grad

    # SFT from the alignment weights through the CLI (train.py's own code, in this process: test_cli_overrides
    # runs it as a new process); lr 0 keeps them, so the SFT checkpoint holds them.
    runs = str(tmp_path / "runs")
    sft = [f"init_from={ckpt}", "trainer.max_steps=1", "trainer.limit_val_batches=0", "logging.run_name=sft"]
    status = run_script_here(
        "train.py", *tiny_overrides(shapes_root, runs), *sft, "optim.lr=0", "checkpoint.every_n_train_steps=1"
    )
    assert status == 0
    after = torch.load(os.path.join(runs, "quickstart", "sft", "checkpoints", "last.ckpt"), weights_only=True)
    for key in ("model.projector.0.weight", "model.projector.2.bias"):
        assert torch.equal(after["state_dict"][key], state["state_dict"][key]), key
    fresh = build_module(tiny_cfg())  # without init_from the projector is a different random init
    assert not torch.equal(fresh.model.projector[0].weight, state["state_dict"]["model.projector.0.weight"])


@pytest.mark.slow  # a process importing torch, transformers and lightning (~9 s): a quiet machine's fast suite
def test_cli_overrides(shapes_root, tmp_path):
    runs = str(tmp_path / "runs")
    proc = train_cli(*tiny_overrides(shapes_root, runs), "trainer.max_steps=1", "trainer.log_every_n_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr  # validation metrics and a closing summary, no advert
    assert "finished at step 1" in console and "run directory:" in console and "💡" not in console
    (config,) = glob.glob(str(tmp_path / "runs" / "quickstart" / "*" / "config.yaml"))
    assert len(scalars(os.path.dirname(config), "train/loss")) == 1


@pytest.mark.slow  # six train.py processes, forked from the test process server (about 7 s to start it)
def test_cli_errors_are_one_line_with_status_2(shapes_root, tmp_path):
    errors = (
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["experiments/nowhere.yaml"], "config file not found"),
        (["model.encoder.name=resnet"], "'model.encoder.name' = 'resnet' is not valid"),
        (["init_from=nowhere.ckpt", *tiny_overrides(shapes_root, str(tmp_path / "runs"))], "checkpoint not found"),
    )
    describe = ["experiments/quickstart.yaml", "--describe", "model.llm.lora={r: 4}"]  # the flag anywhere
    *procs, help_text, described = run_script("train.py", [args for args, _ in errors] + [["--help"], describe])
    for (args, needle), proc in zip(errors, procs):
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and needle in proc.stderr, (args, proc.stderr[-2000:])
        assert proc.stderr.splitlines()[-1].startswith("error: "), proc.stderr
    assert help_text.returncode == 0 and "--describe" in help_text.stdout
    assert described.returncode == 0, described.stderr[-2000:]
    assert "llm_base" in described.stdout and not os.path.exists(tmp_path / "runs")


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
    assert list(scalars(trainer.logger.log_dir, "data/skipped_records").values()) == [1.0]


class GeneratingBatches(L.Callback):
    """Keeps (updates, scored answers) of the module's exact match at each validation's end, before it is reset."""

    def __init__(self) -> None:
        self.counts = []

    def on_validation_epoch_end(self, trainer, module) -> None:  # callbacks run before the module's own hook
        if not trainer.sanity_checking:
            self.counts.append((module.val_accuracy.update_count, float(module.val_accuracy.weight)))


def test_unreadable_images_never_stop_a_run(tiny_cfg, shapes_root, tmp_path):
    """on_error=skip with whole batches of unreadable images (train and validation): the run goes on, the
    stand-ins score nothing, and both kinds of skips are counted in TensorBoard."""
    import json
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(shapes_root, "images"), folder / "images")
    train = [r for r in json.load(open(os.path.join(shapes_root, "sft_train.json"))) if r.get("image")][:16]
    val = json.load(open(os.path.join(shapes_root, "sft_val.json")))[:4]
    for record in train + val[:2]:  # every training image and the first validation batch
        (folder / record["image"]).write_bytes(b"not an image")
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    cfg = tiny_cfg(
        "data.builtin=null",
        f"data.train_json={tmp_path / 'train.json'}",
        f"data.val_json={tmp_path / 'val.json'}",
        f"data.image_folder={folder}",
        f"model.tokenizer={shapes_root}/tokenizer",
        "data.on_error=skip",
        "data.val_batch_size=2",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
    )
    generating = GeneratingBatches()
    trainer = fit(cfg, generating)
    assert trainer.global_step == 2
    # the batch of stand-ins still updates the exact match, with weight 0, so under DDP a rank holding only stand-ins
    # joins the epoch-end sum over ranks instead of leaving the others waiting; the mean is the readable batch's
    assert generating.counts[-1] == (2, 2.0)
    run = trainer.logger.log_dir
    assert list(scalars(run, "train/loss").values()) == [0.0, 0.0]  # nothing but stand-ins: no signal, no NaN
    assert max(scalars(run, "data/skipped_images").values()) == 16
    assert list(scalars(run, "data/skipped_val_images").values())[-1] == 2
    assert torch.isfinite(torch.tensor(list(scalars(run, "val/loss").values()))).all()
