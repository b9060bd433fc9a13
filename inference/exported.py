"""Answers from an exported directory (inference/export.py): transformers' `LlavaForConditionalGeneration` (or
`LlavaNextForConditionalGeneration`, an AnyRes run's) and the processor the export wrote, so `tools.predict` takes
an export as it takes a run directory:

    python -m tools.predict exported/X --image photo.png --question "What color are the shapes?"

The same interface as `lit_modules.predictor.Predictor` (`answer_records`; `ask` from their base `Asking`).
Prompts go through the exported chat template (the run's training template) as strings in LLaVA's form
(`<image>\\n` + question), images through `datamodules.images.load_image` and the exported image
processor, generation through `generate()` with the exported generation config (the run's stop ids,
its `eval.max_new_tokens`).
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from datamodules.images import load_image
from lit_modules.predictor import Asking


def is_export(path: str) -> bool:
    """A directory an export wrote (a transformers LLaVA config and processor), not a run directory."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "processor_config.json")
    )


class ExportedPredictor(Asking):
    """Generation with an exported LLaVA model and its processor.

    Args:
        path: the export directory.
        device: where the model runs (None: cuda when available, else cpu).
    """

    def __init__(self, path: str, device: str | None = None) -> None:
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
        self.model = AutoModelForImageTextToText.from_pretrained(path).eval()  # the config's LLaVA class
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.image_token = self.processor.image_token

    def _prompt(self, record: dict) -> str:
        """The record's conversation up to its last human turn, rendered by the exported chat template."""
        turns = list(record["conversations"])
        if turns and turns[-1].get("from") == "gpt":
            turns = turns[:-1]
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in turns]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def answer_records(
        self,
        records: list[dict],
        image_folder: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """The model's answer to the last human turn of each LLaVA-format record (as `Predictor`'s). Records
        with and without an image are batched apart (the processor takes images for all of a batch or none)."""
        answers: list[str] = [""] * len(records)
        with_image = [i for i, r in enumerate(records) if r.get("image")]
        without = [i for i, r in enumerate(records) if not r.get("image")]
        for group, has_images in ((with_image, True), (without, False)):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                texts = [self._prompt(records[i]) for i in chunk]
                paths = [os.path.join(image_folder or "", records[i]["image"]) for i in chunk] if has_images else []
                images = [load_image(path) for path in paths] or None
                inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
                out = self.model.generate(
                    **inputs.to(self.model.device),
                    max_new_tokens=max_new_tokens or self.model.generation_config.max_new_tokens or 64,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=top_p if temperature > 0 else None,
                )
                new = out[:, inputs["input_ids"].shape[1] :]
                for i, tokens in zip(chunk, new):
                    answers[i] = self.processor.decode(tokens, skip_special_tokens=True).strip()
        return answers
