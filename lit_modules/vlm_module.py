"""The LightningModule: a training stage, optimisation and evaluation around `VisionLanguageModel`."""

from __future__ import annotations

import math

import lightning as L
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lit_modules.flops import StepFlops
from lit_modules.vlm import VisionLanguageModel

# Parts that train in each stage unless the YAML lists `trainable` (LLaVA-1.5 / INF-LLaVA recipes).
STAGE_TRAINABLE = {"align": ("reducer", "enhancer", "projector"), "sft": ("reducer", "enhancer", "projector", "llm")}


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


class VLMModule(L.LightningModule):
    """Trains a `VisionLanguageModel` in one stage and evaluates it by loss and exact match.

    Args:
        model: the VLM to train.
        tokenizer: its tokenizer (decodes generated answers).
        stage: "align" or "sft"; picks the default trainable parts.
        trainable: parts to train instead of the stage's default (e.g. all five for a from-scratch run).
        lr: base learning rate.
        lr_per_part: learning rate per part where it differs from `lr`.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        betas: AdamW betas.
        warmup_ratio: share of the total steps with linear warm-up.
        min_lr_ratio: cosine floor as a share of each group's peak lr.
        stop_ids: token ids that end a generated answer.
        max_new_tokens: generation budget for the held-out exact-match.
        num_logged_samples: validation images logged with question, answer and output.
        max_generate_batches: validation batches that run generation (None: all).
        config: the resolved experiment config (saved in checkpoints and logged as hparams).
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer,
        *,
        stage: str = "sft",
        trainable: list[str] | None = None,
        lr: float = 1e-3,
        lr_per_part: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        stop_ids: list[int] | None = None,
        max_new_tokens: int = 16,
        num_logged_samples: int = 4,
        max_generate_batches: int | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config or {}}, logger=False)
        self.model = model
        self.tokenizer = tokenizer
        self.lr, self.lr_per_part = lr, dict(lr_per_part or {})
        self.weight_decay, self.betas = weight_decay, tuple(betas)
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio
        self.stop_ids = stop_ids or [tokenizer.eos_token_id]
        self.max_new_tokens = max_new_tokens
        self.num_logged_samples = num_logged_samples
        self.max_generate_batches = max_generate_batches
        self.val_accuracy = MeanMetric()
        self.trainable_parts = self.set_stage(stage, trainable)
        self.strict_loading = False  # checkpoints leave out frozen weights; on_load_checkpoint checks the rest
        self._skipped = 0
        self._flop_model: StepFlops | bool | None = None  # False: could not be built
        self._flops_per_batch: int | None = None

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the last training batch (lit_modules/flops.py); Lightning's ThroughputMonitor reads it."""
        return self._flops_per_batch

    # ---- stage ---------------------------------------------------------------------------------
    def set_stage(self, stage: str, trainable: list[str] | None = None) -> tuple[str, ...]:
        """Freeze everything but the stage's parts (or `trainable`) and log each part's counts."""
        if stage not in STAGE_TRAINABLE:
            raise ValueError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGE_TRAINABLE)}")
        parts = tuple(trainable) if trainable is not None else STAGE_TRAINABLE[stage]
        lines = [f"stage {stage!r}: training {', '.join(parts)}", f"{'part':<10}{'total':>15}{'trainable':>15}"]
        for name, params in self.model.parts().items():
            for _, p in params:
                p.requires_grad_(name in parts)
            total = sum(p.numel() for _, p in params)
            lines.append(f"{name:<10}{total:>15,}{total if name in parts else 0:>15,}")
        self.parameter_table = "\n".join(lines)
        rank_zero_info("\n" + self.parameter_table)
        return parts

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, batch: dict, num_items_in_batch: torch.Tensor | None = None):
        # Packed rows (datamodules/packing.py) carry position_ids and go without a mask: transformers
        # isolates their samples from the position resets only when no 2D attention mask is given.
        position_ids = batch.get("position_ids")
        mask = batch["attention_mask"] if position_ids is None else None
        return self.model(
            batch["input_ids"], mask, batch.get("pixel_values"), batch["labels"], num_items_in_batch, position_ids
        )

    def _label_tokens_per_rank(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Label tokens of the global batch / world size (None in one process). Each rank's loss is then
        its token-loss sum / this, so DDP's mean of the ranks' gradients is the gradient of the global
        batch's token mean, as in one process; a plain per-rank mean weights ranks with fewer answer
        tokens up (transformers' Trainer fixes it the same way: `average_tokens_across_devices`)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        n = (labels[:, 1:] != -100).sum().float()  # the causal LM loss scores labels shifted by one
        return self.trainer.strategy.reduce(n, reduce_op="sum") / self.trainer.world_size

    def training_step(self, batch: dict, batch_idx: int):
        self._skipped += batch.get("num_skipped", 0)
        if "input_ids" not in batch:
            return None  # every sample of this batch was skipped
        out = self(batch, self._label_tokens_per_rank(batch["labels"]))
        self._flops_per_batch = self._count_flops(batch)
        # sync_dist: under DDP the curve is the mean over ranks (the global batch), not rank 0's share.
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        if self._skipped:
            self.log("data/skipped_images", float(self._skipped), on_step=True, on_epoch=False)
        return out.loss

    def _count_flops(self, batch: dict) -> int | None:
        if self._flop_model is None:
            try:
                self._flop_model = StepFlops(self.model)
            except Exception as e:  # e.g. parameters ZeRO-3 has sharded away: no shapes to count from
                rank_zero_warn(f"no FLOP count (train/device/flops_per_sec, mfu): {type(e).__name__}: {e}")
                self._flop_model = False
        return self._flop_model.batch_flops(batch) if self._flop_model else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "input_ids" not in batch:
            return
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", self(batch).loss, batch_size=bs, sync_dist=True)
        if self.max_generate_batches is not None and batch_idx >= self.max_generate_batches:
            return
        new_tokens = self.model.generate(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch.get("pixel_values"),
            self.max_new_tokens,
            self.stop_ids,
            self.tokenizer.pad_token_id,
        )
        outputs = [self.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
        hits = [normalise_answer(o) == normalise_answer(a) for o, a in zip(outputs, batch["answers"])]
        self.val_accuracy.update(torch.tensor(hits, dtype=torch.float32, device=self.device))
        if batch_idx == 0:
            self._log_samples(batch, outputs)

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy.update_count:
            acc = self.val_accuracy.compute()
            self.log("val/exact_match", acc)
            self.log("hparams/val_exact_match", acc)
        self.val_accuracy.reset()
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("hparams/val_loss", loss)

    def _log_samples(self, batch: dict, outputs: list[str]) -> None:
        tb = self._tensorboard()
        if tb is None or not self.num_logged_samples or self.trainer.sanity_checking:
            return
        k = self.num_logged_samples
        rows = ["| id | question | answer | model |", "|---|---|---|---|"]
        for i, q, a, o in list(zip(batch["ids"], batch["questions"], batch["answers"], outputs))[:k]:
            rows.append(f"| {i} | {q} | {a} | {o} |")
        tb.add_text("val/samples", "\n".join(rows), self.global_step)
        pixels = batch.get("pixel_values")
        if pixels is not None:
            vision = self.model.vision
            mean = torch.tensor(vision.pixel_mean, device=pixels.device).view(1, 3, 1, 1)
            std = torch.tensor(vision.pixel_std, device=pixels.device).view(1, 3, 1, 1)
            images = (pixels[:k].float() * std + mean).clamp(0, 1)  # [k, 3, S, S] back to 0-1
            tb.add_image("val/images", torchvision.utils.make_grid(images, nrow=k), self.global_step)

    def _tensorboard(self):
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    # ---- logging of the run --------------------------------------------------------------------
    def on_fit_start(self) -> None:
        tb = self._tensorboard()
        if tb is not None:
            tb.add_text("model/parameters", "```\n" + self.parameter_table + "\n```", 0)
        for logger in self.loggers:
            # Metrics named here show in TensorBoard's HPARAMS tab with their latest logged values.
            logger.log_hyperparams(
                _flatten(self.hparams.get("config", {})),
                {"hparams/val_exact_match": 0.0, "hparams/val_loss": float("nan")},
            )
            # Records dropped when the data was checked (data.on_error=skip), by reason.
            skipped = getattr(self.trainer.datamodule, "skipped", None)
            if skipped:
                logger.log_metrics({"data/skipped_records": float(sum(skipped.values()))}, step=0)
                if tb is not None:
                    tb.add_text("data/skipped_records", "\n".join(f"- {k}: {v}" for k, v in skipped.items()), 0)

    # ---- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = []
        for part, params in self.model.parts().items():
            lr = self.lr_per_part.get(part, self.lr)
            decay = [p for n, p in params if p.requires_grad and p.ndim >= 2]
            no_decay = [p for n, p in params if p.requires_grad and p.ndim < 2]  # biases, norms
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.weight_decay, "name": part},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}_no_decay"},
            ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("nothing to train: every part is frozen")
        optimizer = torch.optim.AdamW(groups, betas=self.betas)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=math.ceil(self.warmup_ratio * total),
            num_training_steps=total,
            min_lr_rate=self.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights come back from their own source (the LLM directory, the encoder checkpoint),
        # so a stage-1 checkpoint holds the projector and enhancer, not 8B frozen LLM weights.
        # A sharded FSDP checkpoint keeps them: Lightning loads it into the model's full state-dict layout,
        # and torch.distributed.checkpoint fails on missing keys. (DeepSpeed drops "state_dict" and saves
        # the module itself, without frozen weights: `exclude_frozen_parameters`, lit_modules/strategy.py.)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "_state_dict_type", None) == "sharded":  # FSDPStrategy's setting (private name)
            return
        frozen = {n for params in self.model.parts().values() for n, p in params if not p.requires_grad}
        state = checkpoint["state_dict"]
        dropped = [k for k in state if k.startswith("model.") and k[len("model.") :] in frozen]
        for k in dropped:
            del state[k]
        checkpoint["frozen_keys"] = dropped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:  # FSDP / DeepSpeed restored the weights themselves
            return
        expected = set(self.state_dict())
        missing = expected - set(checkpoint["state_dict"]) - set(checkpoint.get("frozen_keys", []))
        unexpected = set(checkpoint["state_dict"]) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
