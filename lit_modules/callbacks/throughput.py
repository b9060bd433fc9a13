"""Callbacks that log what a VLM step spends: FLOPs, image and text tokens/s, data wait, peak memory.

`ThroughputRates`, Lightning's ThroughputMonitor, logs samples/s, tokens/s and, from the module's
`flops_per_batch`, FLOP/s and MFU. `StepThroughput` sets `flops_per_batch` for each training batch from
the FLOP model (model/flops.py), so it must come before ThroughputRates in the
callback list, and adds the VLM-specific split and where the time goes.

One step's time runs from the previous `on_train_batch_end` to this one. The part of it before
`on_train_batch_start` is "data wait": fetching the batch, plus any work other callbacks do between
steps (a checkpoint save shows up here too). Validation time is left out.

With compiled blocks (`model.compile`, model/blocks.py) `StepThroughput` also prints the compile time once: dynamo
and inductor run inside the first step (forward and backward graphs), so the first step's compute time less the
second's is about what compiling took.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from model.blocks import compiled_blocks
from model.flops import StepFlops

TAGS = (
    "throughput/image_tokens_per_sec",
    "throughput/text_tokens_per_sec",
    # image tokens per training batch (mean and largest over the window): with a tiling (AnyRes) they vary with
    # the images' sizes, and the largest is what the memory has to hold
    "throughput/image_tokens_per_batch",
    "throughput/max_image_tokens_per_batch",
    "throughput/data_wait_fraction",
    "throughput/peak_memory_gib",
)


class ThroughputRates(ThroughputMonitor):
    """Lightning's ThroughputMonitor with its rates under `throughput/` (`throughput/device/flops_per_sec`,
    `throughput/device/mfu`, `throughput/items_per_sec`, ...) and its running totals (time, batches,
    samples, lengths) under `progress/`: Lightning writes both as `train/*`, beside the loss."""

    TOTALS = ("time", "batches", "samples", "lengths")

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:  # Lightning 2.6's hook
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        suffix = "" if stage == RunningStage.TRAINING else f"/{stage.value}"
        metrics = {
            f"{'progress' if k in self.TOTALS else 'throughput'}{suffix}/{k}": v
            for k, v in self._throughputs[stage].compute().items()
        }
        trainer._logger_connector.log_metrics(metrics, step=iter_num)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class StepThroughput(L.Callback):
    """Logs the tags in `TAGS` every `every_n_steps` training batches, averaged over those batches.

    Args:
        every_n_steps: logging interval in training batches (= steps without gradient accumulation).
        keep_history: also keep one record per step in `history` (step_time, data_wait, samples,
            images, text_tokens, image_tokens, flops, peak_memory_gib), for bench/bench_train.py.
    """

    def __init__(self, every_n_steps: int = 10, keep_history: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.keep_history = keep_history
        self.history: list[dict] = []
        self._last_end: float | None = None
        self._start = 0.0
        self._window = self._empty()
        self._flop_model: StepFlops | None = None
        self._no_flops = False  # the FLOP model could not be built for this model
        self._compiled = 0  # blocks compiled by model.compile
        self._first_steps: list[float] = []  # compute seconds of the first two steps, with compiled blocks

    @staticmethod
    def _empty() -> dict:
        return {"time": 0.0, "wait": 0.0, "text": 0, "image": 0, "batches": 0, "image_max": 0}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before the strategy wraps the model: DeepSpeed's hooks cannot be deep-copied for the meta-device
        # probe, and ZeRO-3 / FSDP shard the parameters whose shapes the FLOP model reads.
        if stage == "fit":
            self._has_flop_model(pl_module)
            self._compiled = compiled_blocks(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        pl_module.flops_per_batch = self._batch_flops(pl_module, batch)

    def _has_flop_model(self, pl_module) -> bool:
        if self._flop_model is None and not self._no_flops:
            try:
                self._flop_model = StepFlops(pl_module.model)
            except Exception as e:  # e.g. a model whose shapes the meta-device probe cannot trace
                rank_zero_warn(f"no FLOP count (throughput/device/flops_per_sec, mfu): {type(e).__name__}: {e}")
                self._no_flops = True
        return self._flop_model is not None

    def _batch_flops(self, pl_module, batch: dict) -> int | None:
        if "input_ids" not in batch or not self._has_flop_model(pl_module):
            return None
        return self._flop_model.batch_flops(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels are queued, not finished
        end = time.perf_counter()
        if self._last_end is None:  # first step after start or validation: no previous end to measure from
            self._last_end = self._start
        step_time, wait = end - self._last_end, max(0.0, self._start - self._last_end)
        self._last_end = end
        if self._compiled and len(self._first_steps) < 2:
            self._report_compile(end - self._start)
        image, text = _token_counts(batch, getattr(getattr(pl_module, "model", None), "image_token_id", None))
        w = self._window
        w["time"] += step_time
        w["wait"] += wait
        w["text"] += text
        w["image"] += image
        w["batches"] += 1
        w["image_max"] = max(w["image_max"], image)
        if self.keep_history:
            self.history.append(
                {
                    "step_time": step_time,
                    "data_wait": wait,
                    "samples": len(batch.get("ids", [])),  # samples, not rows (packed rows hold several)
                    "images": _num_images(batch),
                    "text_tokens": text,
                    "image_tokens": image,
                    "flops": getattr(pl_module, "flops_per_batch", None),
                    "peak_memory_gib": peak_memory_gib(device),
                }
            )
        if (batch_idx + 1) % self.every_n_steps == 0 and w["time"] > 0:
            values = (
                w["image"] / w["time"],
                w["text"] / w["time"],
                w["image"] / w["batches"],
                w["image_max"],
                w["wait"] / w["time"],
                peak_memory_gib(device),
            )
            metrics = dict(zip(TAGS, values))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._window = self._empty()

    def _report_compile(self, seconds: float) -> None:
        self._first_steps.append(seconds)
        if len(self._first_steps) == 2:
            first, second = self._first_steps
            rank_zero_info(
                f"model.compile: {self._compiled} blocks compiled in about {first - second:.1f} s "
                f"(first step {first:.1f} s, second {second:.2f} s)"
            )

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last_end = None  # the validation loop is not data wait

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last_end = None  # nor is the end-of-epoch work (so an epoch's first step counts no wait)


def _num_images(batch: dict) -> int:
    """Images in the batch: one row of `image_sizes` each with a tiling (whose `pixel_values` are the views)."""
    if batch.get("image_sizes") is not None:
        return int(batch["image_sizes"].shape[0])
    return int(batch["pixel_values"].shape[0]) if batch.get("pixel_values") is not None else 0


def _token_counts(batch: dict, image_token_id: int | None) -> tuple[int, int]:
    """(image tokens, text tokens) among the batch's non-padding positions."""
    if "input_ids" not in batch:
        return 0, 0
    mask = batch.get("attention_mask")
    real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    image = int((batch["input_ids"] == image_token_id).sum()) if image_token_id is not None else 0
    return image, real - image
