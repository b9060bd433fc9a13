"""The training stages, written once: what each trains, its default template and the built-in data it reads.

A YAML's `stage: align | sft` names a row of `STAGES`. The model freezes by it
(`VisionLanguageModel.freeze_for`), the DataModule takes its default template from it, the built-in
dataset fills in its files from it (`datamodules.shapes.builtin_data`) and validation accepts its names;
nothing else lists the stages. Recipes: LLaVA-1.5 / INF-LLaVA (stage 1 aligns the projector on captions
with the "plain" format, stage 2 tunes the projector and the LLM on chat-formatted instructions).

This module imports nothing from the project but the registry type.
"""

from __future__ import annotations

from dataclasses import dataclass

from foundation.registry import Registry

# The parts of a VLM in the order data flows through them; a stage trains some of them.
PARTS = ("encoder", "reducer", "enhancer", "projector", "llm")


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        trains: the parts that train unless the YAML lists `trainable` (a subset of `PARTS`).
        default_template: the conversation template (a `datamodules.templates.TEMPLATES` name) when
            `data.template` is unset.
        builtin_train: the built-in dataset's training file for this stage (under its root).
        builtin_val: its validation file, or None: then `builtin_val_fraction` of the training file is
            held out (unless `data.val_fraction` is set).
        builtin_val_fraction: see `builtin_val`.
    """

    trains: tuple[str, ...]
    default_template: str
    builtin_train: str
    builtin_val: str | None = None
    builtin_val_fraction: float = 0.0

    def template(self, template: str | None) -> str:
        """`data.template`, or this stage's default when it is unset."""
        return template or self.default_template


STAGES = Registry("stage")
# Stage 1: LLaVA's "plain" format (image tokens + caption + newline, loss on the caption); captions only.
STAGES.register(
    "align",
    Stage(("reducer", "enhancer", "projector"), "plain", "align.json", None, builtin_val_fraction=0.05),
)
# Stage 2: chat-formatted multi-turn instructions (the tokenizer's own template by default), loss on answers.
STAGES.register(
    "sft",
    Stage(("reducer", "enhancer", "projector", "llm"), "chat_template", "sft_train.json", "sft_val.json"),
)
