"""The LightningModule: steps, optimisation and metrics around a `VisionLanguageModel`.

What is not a step lives elsewhere: the model is composed in model/build.py, a stage's freezing
in `VisionLanguageModel.freeze_for`, FLOPs and throughput, validation samples and the run summary in
lit_modules/callbacks/. A trained module is rebuilt from its checkpoint with `inference.load.load_module`.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torchmetrics import MeanMetric

from foundation.schema import EvalConfig, OptimConfig
from lit_modules.lr_schedule import WarmupCosine
from lit_modules.optim_in_backward import StepsInBackward
from lit_modules.optimizer import build_optimizer
from lit_modules.source_metrics import SourceMeans
from metrics import METRICS
from model.loss import sample_losses
from model.vlm import VisionLanguageModel


class VLMModule(L.LightningModule):
    """Trains a `VisionLanguageModel` in one stage and evaluates it by loss and exact match.

    Args:
        model: the VLM to train.
        tokenizer: its tokenizer (decodes generated answers).
        stage: "align" or "sft"; picks the default trainable parts.
        trainable: parts to train instead of the stage's default (e.g. all five for a from-scratch run).
        optim: learning rates (per part where they differ), AdamW settings, warm-up and cosine floor.
        evaluation: generation budget and how much of the validation set runs generation.
        stop_ids: token ids that end a generated answer (the template's end of turn and EOS).
        config: the resolved experiment config, saved in checkpoints so `inference.load.load_module`
            rebuilds the model without the YAML.
    """

    # Lightning's ThroughputMonitor reads FLOPs of the current batch here; the StepThroughput callback
    # sets it from the FLOP model (model/flops.py).
    flops_per_batch: int | None = None

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer,
        *,
        stage: str = "sft",
        trainable: list[str] | None = None,
        optim: OptimConfig | None = None,
        evaluation: EvalConfig | None = None,
        stop_ids: list[int] | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config or {}}, logger=False)
        self.model = model
        self.tokenizer = tokenizer
        self.optim = optim or OptimConfig()
        self.evaluation = evaluation or EvalConfig()
        self.stop_ids = stop_ids or [tokenizer.eos_token_id]
        self.val_accuracy = MeanMetric()
        # a mixture's validation per source (lit_modules/source_metrics.py), set up with the data (`setup`)
        self.val_sources: list[str] = []
        self.val_loss_per_source: SourceMeans | None = None
        self.val_accuracy_per_source: SourceMeans | None = None
        self.parameter_table = model.freeze_for(stage, trainable)
        rank_zero_info("\n" + self.parameter_table)
        self.strict_loading = False  # checkpoints leave out frozen weights; on_load_checkpoint checks the rest
        self._skipped = 0
        # optim.in_backward: the optimizer steps inside backward (lit_modules/optim_in_backward.py), so the step is
        # this module's own (manual optimization): backward, the rest of the step, the scheduler
        self.automatic_optimization = not self.optim.in_backward

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, batch: dict, num_items_in_batch: torch.Tensor | None = None, full_logits: bool = False):
        # Packed rows (datamodules/packing.py) carry position_ids and go without a 2D mask: the samples are kept
        # apart from the position resets, as `model.llm.packed_attention` says (model/attention.py).
        # The loss takes the LM head on labelled positions only (model/loss.py); `full_logits` for every one.
        position_ids = batch.get("position_ids")
        mask = batch["attention_mask"] if position_ids is None else None
        return self.model(
            batch["input_ids"],
            mask,
            batch.get("pixel_values"),
            batch["labels"],
            num_items_in_batch,
            position_ids,
            full_logits=full_logits,
            image_sizes=batch.get("image_sizes"),  # [M, 2] with a tiling tower (AnyRes): which views are whose
        )

    def _label_tokens_per_rank(self, labels: torch.Tensor) -> torch.Tensor:
        """What each rank divides its token-loss sum by: the global batch's label tokens / world size (in
        one process, this batch's label tokens). DDP's mean of the ranks' gradients is then the gradient
        of the global batch's token mean, as in one process; a plain per-rank mean weights ranks with fewer
        answer tokens up (transformers' Trainer fixes it the same way: `average_tokens_across_devices`).
        At least 1: a batch of stand-ins for unreadable images (no labels) scores 0, not 0 / 0."""
        n = (labels[:, 1:] != -100).sum().float()  # the causal LM loss scores labels shifted by one
        if self._trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum") / self.trainer.world_size
        return n.clamp(min=1.0)

    def training_step(self, batch: dict, batch_idx: int):
        self._skipped += batch.get("num_skipped", 0)
        loss = None
        if "input_ids" in batch:  # else every sample of this batch was skipped
            loss = self(batch, self._label_tokens_per_rank(batch["labels"])).loss
            # sync_dist: under DDP the curve is the mean over ranks (the global batch), not rank 0's share.
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
            if self._skipped:
                self.log("data/skipped_images", float(self._skipped), on_step=True, on_epoch=False)
        if not self.automatic_optimization:
            self._step_in_backward(loss)
        return loss

    def _step_in_backward(self, loss: torch.Tensor | None) -> None:
        """`optim.in_backward`'s step, in the order Lightning's automatic one takes: backward (each parameter steps
        in it, StepsInBackward), the rest of the optimizer step, then the lr scheduler. A batch of skipped samples
        still steps (every gradient zero), as the automatic path does when training_step returns None."""
        if loss is not None:
            self.manual_backward(loss)
        self.optimizers().step()  # also counts the step (trainer.global_step)
        self.lr_schedulers().step()

    def setup(self, stage: str) -> None:
        # The DataModule names the sources its validation batches come from (a mixture's, else none): each gets
        # `val/loss/<source>` and `val/exact_match/<source>` beside the pooled keys. Set up before the strategy
        # moves the module to its device, so the metrics' states go with it.
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = list(getattr(datamodule, "val_sources", None) or [])
        if names != self.val_sources:
            self.val_sources = names
            self.val_loss_per_source = SourceMeans(names) if names else None
            self.val_accuracy_per_source = SourceMeans(names) if names else None

    def validation_step(self, batch: dict, batch_idx: int) -> dict | None:
        """Loss on every batch; greedy answers (returned for the ValidationSamples callback) and exact
        match on the first `eval.max_generate_batches` batches (all when None); each also per source of a mixture."""
        if "input_ids" not in batch:
            return None
        # The token mean over the validation set: each batch weighs by its label tokens (stand-ins for
        # unreadable images have none). Every rank logs every batch, so the epoch-end reduction lines up.
        tokens = (batch["labels"][:, 1:] != -100).sum()
        out = self(batch, tokens.float().clamp(min=1.0))
        self.log("val/loss", out.loss, batch_size=int(tokens), sync_dist=True)
        self.log("data/skipped_val_images", float(batch.get("num_skipped", 0)), reduce_fx="sum", sync_dist=True)
        source = self._source_index(batch)  # [B] or None
        if source is not None:  # validation rows are one sample each (never packed)
            scored = (batch["labels"][:, 1:] != -100).sum(1)  # [B]
            self.val_loss_per_source.update(source, sample_losses(out, batch["labels"]), scored)
        limit = self.evaluation.max_generate_batches
        if limit is not None and batch_idx >= limit:
            return None
        new_tokens = self.model.generate(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch.get("pixel_values"),
            self.evaluation.max_new_tokens,
            self.stop_ids,
            self.tokenizer.pad_token_id,
            image_sizes=batch.get("image_sizes"),
        )
        outputs = [self.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
        # a sample whose image could not be read is not scored
        kept = [k for k, skipped in enumerate(batch["skipped"].tolist()) if not skipped]
        # the benchmarks' exact match (metrics/exact_match.py), so `val/exact_match` is the number they report;
        # updated on every generating batch, with weight 0 when nothing was scored, so every rank holds an update and
        # joins the sum over ranks at epoch end (a rank that skipped would leave the others waiting for it)
        predictions, answers = [outputs[k] for k in kept], [batch["answers"][k] for k in kept]
        accuracy = METRICS.build("exact_match", predictions, answers)["accuracy"] if kept else 0.0
        self.val_accuracy.update(torch.tensor(accuracy, device=self.device), weight=len(kept))
        if source is not None:  # every generating batch updates it on every rank, answers scored or not
            hits = [METRICS.build("exact_match", [outputs[k]], [batch["answers"][k]])["accuracy"] for k in kept]
            self.val_accuracy_per_source.update(source[kept], torch.tensor(hits), torch.ones(len(kept)))
        return {"outputs": outputs}

    def _source_index(self, batch: dict) -> torch.Tensor | None:
        """Each sample's source as an index into `val_sources` [B] (None when validation is not per source)."""
        if self.val_loss_per_source is None:
            return None
        index = {name: k for k, name in enumerate(self.val_sources)}
        return torch.tensor([index[name] for name in batch["sources"]], device=self.device)

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy.update_count:  # the same on every rank: each generates on as many batches
            acc = self.val_accuracy.compute()
            if torch.isfinite(acc):  # nan: no rank scored an answer (every image unreadable)
                self.log("val/exact_match", acc)
                self.log("hparams/val_exact_match", acc)
        self.val_accuracy.reset()
        if self.val_loss_per_source is not None:
            self._log_per_source("val/loss", self.val_loss_per_source)
            if self.evaluation.max_generate_batches != 0:  # else nothing generated, on any rank
                self._log_per_source("val/exact_match", self.val_accuracy_per_source)
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("hparams/val_loss", loss)

    def _log_per_source(self, key: str, metric: SourceMeans) -> None:
        # computed on every rank, whatever this rank's share held: the sums are added over the ranks, so every rank
        # logs the same numbers
        for name, value in metric.compute().items():
            self.log(f"{key}/{name}", value)
        metric.reset()

    # ---- optimisation --------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's FSDP precision plugin refuses to clip by norm (every FSDP run with `gradient_clip_val`
        # failed at its first step); the root FSDP module's clip_grad_norm_ takes the norm over all shards.
        model = self._trainer.strategy.model if self._trainer is not None else None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(model, FSDP):
            model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Every trainable parameter steps every step, as under DDP: there a text-only batch still sends the
        # vision path a zero gradient (VisionLanguageModel.embed), so AdamW applies its momentum and weight
        # decay to it. In one process the vision parameters would get no gradient and skip the step, and
        # N processes x batch b would drift from one process x batch N*b after a global batch with no image.
        # DeepSpeed / FSDP keep their own grads. StepsInBackward does the same itself, for the parameters that did
        # not step in backward (the others have no gradient left).
        if isinstance(self._trainer.strategy, SingleDeviceStrategy) and not isinstance(optimizer, StepsInBackward):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)

    def configure_optimizers(self):
        groups = []
        for part, params in self.model.parts().items():
            lr = self.optim.lr_per_part.get(part, self.optim.lr)
            decay = [p for n, p in params if p.requires_grad and p.ndim >= 2]
            no_decay = [p for n, p in params if p.requires_grad and p.ndim < 2]  # biases, norms
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.optim.weight_decay, "name": part},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}_no_decay"},
            ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("nothing to train: every part is frozen")
        self._remove_in_backward_hooks()  # a second fit of this module: the first one's optimizer lets go
        optimizer = build_optimizer(groups, self.optim, self.trainer.strategy)  # lit_modules/optimizer.py
        if isinstance(optimizer, StepsInBackward):
            self._in_backward = optimizer
            # Nothing but the in-backward step reads a gradient here (no clipping, accumulation or second rank): an
            # optimizer that takes sparse ones gets the input embedding's as the rows the batch used, instead of a
            # dense [vocabulary, D] one (0.25 GiB at Llama-3's vocabulary and D 512, made and zeroed every step).
            self._sparse_embedding_gradient(getattr(optimizer, "takes_sparse_gradients", False))
        total = int(self.trainer.estimated_stepping_batches)
        # restored from a resumed run's checkpoint; on_train_start reconciles it with `total` (optim.extend)
        self.lr_schedule = WarmupCosine(math.ceil(self.optim.warmup_ratio * total), total, self.optim.min_lr_ratio)
        self._planned_steps = total
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _remove_in_backward_hooks(self) -> None:
        if getattr(self, "_in_backward", None) is not None:
            self._in_backward.remove_hooks()
            self._in_backward = None
            self._sparse_embedding_gradient(False)

    def _sparse_embedding_gradient(self, sparse: bool) -> None:
        embedding = self.model.llm.get_input_embeddings()
        if isinstance(embedding, torch.nn.Embedding) and embedding.sparse != sparse:
            embedding.sparse = sparse
            if sparse and embedding.weight.requires_grad:
                rank_zero_info("optim.in_backward: the input embedding's gradient is sparse, the rows each batch used")

    def teardown(self, stage: str) -> None:
        self._remove_in_backward_hooks()  # the parameters no longer step on their own after the fit

    def on_train_start(self) -> None:
        # A resumed run's schedule came back with the scheduler's state; a run made longer or shorter since
        # extends it from here as optim.extend says (lit_modules/lr_schedule.py), never with a jump.
        schedule = getattr(self, "lr_schedule", None)
        if schedule is not None and schedule.end != self._planned_steps:
            schedule.extend(self.trainer.global_step, self._planned_steps, self.optim.extend)

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights come back from their own source (the LLM directory, the encoder checkpoint),
        # so a stage-1 checkpoint holds the projector and enhancer, not 8B frozen LLM weights.
        # A sharded FSDP checkpoint keeps them: Lightning loads it into the model's full state-dict layout,
        # and torch.distributed.checkpoint fails on missing keys. (DeepSpeed drops "state_dict" and saves
        # the module itself, without frozen weights: `exclude_frozen_parameters`, experiment/strategy.py.)
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
