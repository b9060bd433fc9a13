"""Throughput logging: the StepThroughput callback's tags and numbers, and FLOP/s from flops_per_batch."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiment.assemble import build_datamodule, build_module
from experiment.runner import build_trainer
from lit_modules.callbacks.throughput import TAGS, StepThroughput
from model.flops import StepFlops


def test_tiny_fit_logs_throughput_and_flops(tiny_cfg):
    cfg = tiny_cfg(
        "trainer.max_steps=12", "trainer.max_epochs=2", "trainer.log_every_n_steps=2", "trainer.limit_val_batches=0"
    )
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg)
    trainer = build_trainer(cfg, None)
    history = StepThroughput(every_n_steps=1000, keep_history=True)
    trainer.callbacks.append(history)
    trainer.fit(module, datamodule=build_datamodule(cfg, module.tokenizer))

    ea = EventAccumulator(trainer.logger.log_dir)
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in (*TAGS, "throughput/device/flops_per_sec"):
        assert tag in scalars, (tag, sorted(scalars))
    assert "throughput/device/mfu" not in scalars  # no peak FLOPs known for a CPU
    # Lightning's running totals are kept out of the train/ group, which holds the loss
    assert {"progress/time", "progress/samples", "progress/batches"} <= scalars
    assert sorted(t for t in scalars if t.startswith("train/")) == ["train/loss"], sorted(scalars)
    assert all(0.0 <= e.value <= 1.0 for e in ea.Scalars("throughput/data_wait_fraction"))
    assert all(e.value > 0 for e in ea.Scalars("throughput/peak_memory_gib"))

    # each image gives 16 tokens (some samples of the shapes data have none); text tokens are the rest
    steps = history.history
    assert len(steps) == 12
    assert all(s["image_tokens"] == 16 * s["images"] > 0 and s["text_tokens"] > 0 for s in steps)
    # flops_per_batch is the last batch's count, and the logged rate is of the order of FLOPs / step time
    flops = StepFlops(module.model)
    assert module.flops_per_batch == steps[-1]["flops"] and steps[-1]["flops"] > 0
    batch = next(iter(trainer.datamodule.train_dataloader()))
    assert flops.batch_flops(batch) == pytest.approx(steps[0]["flops"], rel=0.5)  # same model, similar lengths
    rate = ea.Scalars("throughput/device/flops_per_sec")[-1].value
    mean_rate = sum(s["flops"] for s in steps[-9:]) / sum(s["step_time"] for s in steps[-9:])
    assert 0.3 < rate / mean_rate < 3


class FakeClock:
    """The callback's `time` module: a clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    monotonic = perf_counter


def test_data_wait_fraction(monkeypatch):
    """Data fetched in 0.2 s, step computed in 0.1 s: 2/3 of the step time is data wait."""
    import lit_modules.callbacks.throughput as throughput

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    trainer = SimpleNamespace(loggers=[logger], global_step=0)
    module = SimpleNamespace(device=torch.device("cpu"), model=SimpleNamespace(image_token_id=7))
    batch = {"input_ids": torch.tensor([[7, 7, 1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    cb = StepThroughput(every_n_steps=2, keep_history=True)
    cb.on_train_epoch_start(trainer, module)
    for i in range(3):
        if i:
            clock.now += 0.2  # waiting for the next batch
        cb.on_train_batch_start(trainer, module, batch, i)
        clock.now += 0.1  # the step
        cb.on_train_batch_end(trainer, module, None, batch, i)
    # logged after batch index 1 (0.1 s, no wait measured for the epoch's first step + 0.3 s with 0.2 s wait)
    (m,) = logged
    assert m["throughput/data_wait_fraction"] == pytest.approx(0.2 / 0.4)
    assert m["throughput/image_tokens_per_sec"] == pytest.approx(4 / 0.4)  # 2 image tokens a batch
    assert m["throughput/text_tokens_per_sec"] == pytest.approx(4 / 0.4)  # 2 text tokens (padding left out)
    steps = [(s["step_time"], s["data_wait"]) for s in cb.history]
    assert steps == [pytest.approx((0.1, 0.0)), pytest.approx((0.3, 0.2)), pytest.approx((0.3, 0.2))]


def test_image_tokens_per_batch_follow_each_batch(monkeypatch):
    """A tiling gives each batch its own image-token count (AnyRes: by the images' sizes): the window logs their
    mean and the largest, and the history counts images by `image_sizes`, not by their views."""
    import lit_modules.callbacks.throughput as throughput

    monkeypatch.setattr(throughput, "time", FakeClock())
    logged = []
    trainer = SimpleNamespace(loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))], global_step=0)
    module = SimpleNamespace(device=torch.device("cpu"), model=SimpleNamespace(image_token_id=7))
    batches = [
        {"input_ids": torch.tensor([[7, 7, 7, 1]]), "image_sizes": torch.tensor([[40, 600]]),
         "pixel_values": torch.zeros(4, 3, 2, 2)},  # one image, 4 views, 3 image tokens
        {"input_ids": torch.tensor([[7, 7, 7, 7, 7, 1], [7, 7, 7, 7, 7, 2]]),
         "image_sizes": torch.tensor([[30, 30], [20, 26]]), "pixel_values": torch.zeros(2, 3, 2, 2)},
    ]  # fmt: skip
    cb = StepThroughput(every_n_steps=2, keep_history=True)
    for i, batch in enumerate(batches):
        cb.on_train_batch_start(trainer, module, batch, i)
        throughput.time.now += 0.1
        cb.on_train_batch_end(trainer, module, None, batch, i)
    (m,) = logged
    assert m["throughput/image_tokens_per_batch"] == pytest.approx((3 + 10) / 2)
    assert m["throughput/max_image_tokens_per_batch"] == 10
    assert [s["images"] for s in cb.history] == [1, 2] and [s["image_tokens"] for s in cb.history] == [3, 10]
