"""A callback that records what a run is at its start: parameters per part, the hyper-parameters that decide a
comparison (TensorBoard's HPARAMS tab), a custom-scalars layout, and the records the data check skipped."""

from __future__ import annotations

import lightning as L
from torch.utils.tensorboard.summary import hparams

from encoders import VisionEncoder
from encoders.token_counts import image_token_counts
from lit_modules.callbacks.validation_samples import tensorboard

# Metrics the HPARAMS tab shows beside each run; VLMModule logs them at every validation. Only their
# names go into the hparams summary: no placeholder values are logged.
HPARAM_METRICS = ("hparams/val_exact_match", "hparams/val_loss")
# TensorBoard's custom-scalars dashboard: the curves a comparison needs, side by side. Tags are regular expressions
# matched at the start of a tag: `val/loss$` keeps a mixture's `val/loss/<source>` to a chart of their own.
LAYOUT = {
    "loss": {"train and validation loss": ["Multiline", ["train/loss$", "val/loss$"]]},
    "evaluation": {
        "held-out exact match": ["Multiline", ["val/exact_match$"]],
        "benchmarks": ["Multiline", ["eval/.*"]],
    },
    "throughput": {
        "tokens per second": ["Multiline", ["throughput/image_tokens_per_sec", "throughput/text_tokens_per_sec"]],
        "image tokens per batch": ["Multiline", ["throughput/.*image_tokens_per_batch"]],
        "samples per second": ["Multiline", ["throughput/device/samples_per_sec"]],
        "data wait": ["Multiline", ["throughput/data_wait_fraction"]],
    },
    "learning rate": {"per part": ["Multiline", ["lr/.*"]]},
}
# With validation per source (a mixture, lit_modules/source_metrics.py): each source's curve beside the pooled one.
PER_SOURCE_LAYOUT = {
    "loss": {"validation loss per source": ["Multiline", ["val/loss$", "val/loss/.*"]]},
    "evaluation": {"held-out exact match per source": ["Multiline", ["val/exact_match$", "val/exact_match/.*"]]},
}


def layout(per_source: bool) -> dict:
    """`LAYOUT`, with the `PER_SOURCE_LAYOUT` charts after their category's own when validation is per source."""
    if not per_source:
        return LAYOUT
    return {category: {**charts, **PER_SOURCE_LAYOUT.get(category, {})} for category, charts in LAYOUT.items()}


def image_token_hparams(vision: VisionEncoder, data=None) -> dict[str, int | float | str]:
    """`image_tokens`, what the LLM sees of one image: a plain tower's `num_tokens`. A tiling's count depends on
    the image's size, so there, with `data` (the DataModule's `image_token_stats()`: the run's own training images,
    counted by their record indexes), `image_tokens` is their mean per image and `image_tokens_min` /
    `image_tokens_max` the fewest and most an image takes; without (no images, or a source with no per-record
    counts: shards), the largest and smallest at encoders/token_counts.py's `EXAMPLE_SIZES` (`image_tokens` is then
    the count `--describe` budgets the sequence for) and the most views an image takes there (`image_views`).
    `image_tokens_from` says which. Beside them one encoder view's count (`image_tokens_per_view`): two tilings
    with different grid pinpoints or max_tiles share a tower, hence a per-view count, but not the others."""
    counts = image_token_counts(vision)
    if not counts.varies:
        return {"image_tokens": counts.per_view}
    if data is not None:
        return {
            "image_tokens": round(data.mean, 2),  # a mean: sorts as a number, two decimals shown
            "image_tokens_min": data.min,
            "image_tokens_max": data.max,
            "image_tokens_per_view": counts.per_view,
            "image_tokens_from": "training data",
        }
    return {
        "image_tokens": max(counts.tokens),
        "image_tokens_min": min(counts.tokens),
        "image_tokens_max": max(counts.tokens),
        "image_tokens_per_view": counts.per_view,
        "image_views": max(counts.views),
        "image_tokens_from": "example sizes",
    }


def comparison_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """What decides a comparison between runs: encoder (and its reducer, enhancer, tiling), image size and
    tokens (`image_token_hparams`, of the training images when `trainer.datamodule` counts them), projector, LLM,
    stage, trainable parts, learning rate, global batch, steps, and every command-line override."""
    cfg = pl_module.hparams.get("config", {})
    model, vision = cfg.get("model", {}), pl_module.model.vision
    text = pl_module.model.llm.config.get_text_config()
    llm = model.get("llm", {})
    data, optim = cfg.get("data", {}), cfg.get("optim", {})
    accumulate = trainer.accumulate_grad_batches
    stats = getattr(getattr(trainer, "datamodule", None), "image_token_stats", None)  # LLaVADataModule's
    out = {
        "encoder": model.get("encoder", {}).get("name"),
        "reducer": (model.get("reducer") or {}).get("name", "none"),
        "enhancer": (model.get("enhancer") or {}).get("name", "none"),
        "tiling": (model.get("tiling") or {}).get("name", "none"),
        "image_size": vision.image_size,
        **image_token_hparams(vision, stats() if callable(stats) else None),
        "projector": model.get("projector"),
        "llm": llm.get("path") or f"{text.model_type} {text.num_hidden_layers}x{text.hidden_size} (random init)",
        "lora": "none" if not llm.get("lora") else str(llm["lora"]),
        "stage": cfg.get("stage"),
        "trainable": ",".join(p for p, ps in pl_module.model.parts().items() if any(q.requires_grad for _, q in ps)),
        "lr": optim.get("lr"),
        "global_batch": (data.get("batch_size") or 0) * trainer.world_size * accumulate,
        "steps": int(trainer.estimated_stepping_batches),
    }
    for override in cfg.get("overrides", []):
        key, _, value = override.partition("=")
        out[f"override/{key}"] = value
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in out.items()}


class RunSummary(L.Callback):
    """At fit start, on the TensorBoard logger: the module's parameter table as text `model/parameters`,
    `comparison_hparams` with the names of `HPARAM_METRICS` in HPARAMS, the custom-scalars `layout`, and
    the records the DataModule dropped when checking the data (`data.on_error=skip`) as
    `data/skipped_records`, by reason, and records with an id seen before as `data/duplicate_ids`."""

    def on_fit_start(self, trainer, pl_module) -> None:
        tb = tensorboard(trainer)
        skipped = getattr(trainer.datamodule, "skipped", None)
        duplicates = getattr(trainer.datamodule, "duplicate_ids", 0)
        for logger in trainer.loggers:
            if skipped:
                logger.log_metrics({"data/skipped_records": float(sum(skipped.values()))}, step=0)
            if duplicates:
                logger.log_metrics({"data/duplicate_ids": float(duplicates)}, step=0)
        if tb is None or not trainer.is_global_zero:
            return
        table = getattr(pl_module, "parameter_table", None)
        if table:
            tb.add_text("model/parameters", "```\n" + table + "\n```", 0)
        writer = tb._get_file_writer()  # SummaryWriter's own accessor, as Lightning's logger uses it
        sets = pl_module.hparams.get("config", {}).get("eval", {}).get("sets", [])
        names = [*HPARAM_METRICS, *(f"hparams/eval/{s['name']}" for s in sets)]  # lit_modules/benchmarks.py logs these
        for summary in hparams(comparison_hparams(trainer, pl_module), {name: 0.0 for name in names}):
            writer.add_summary(summary)  # the experiment and its metric names; values come from the scalars
        tb.add_custom_scalars(layout(bool(getattr(pl_module, "val_sources", None))))
        if skipped:
            tb.add_text("data/skipped_records", "\n".join(f"- {k}: {v}" for k, v in skipped.items()), 0)
