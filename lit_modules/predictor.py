"""Answers from a trained run: the run's own template, image preprocessing and generation settings.

    predictor = load_predictor("runs/quickstart/defaults")               # experiment.runner: its last.ckpt (or best)
    predictor.ask("What color are the shapes?", image="photo.png")
    predictor.answer_records(records, image_folder="data/images")          # LLaVA-format records

A record goes through the same pipeline as a validation sample (DataModule.encode -> LLaVADataset ->
collate -> VisionLanguageModel.generate), so an answer here is the answer validation would give.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from datamodules.llava_data import LLaVADataset, Sample, collate

PLACEHOLDER_ANSWER = "."  # the template needs an answer turn; only the prompt before it is used


class Interrupted(Exception):
    """Answering stopped early because `should_stop` said so (SIGTERM during a training-time evaluation)."""


class Asking:
    """`ask` on top of `answer_records(records, image_folder, batch_size, **options)` and `image_token`
    (Predictor here, ExportedPredictor in inference/exported.py)."""

    image_token: str

    def ask(self, question: str, image: str | None = None, history: list[tuple[str, str]] = (), **options) -> str:
        """One answer: `question` after the earlier (question, answer) turns of `history`, about `image`."""
        turns = []
        for q, a in [*history, (question, None)]:
            turns.append({"from": "human", "value": q})
            if a is not None:
                turns.append({"from": "gpt", "value": a})
        if image is not None:
            turns[0] = {"from": "human", "value": f"{self.image_token}\n{turns[0]['value']}"}
        record = {"id": "ask", "image": os.path.basename(image) if image else None, "conversations": turns}
        folder = os.path.dirname(os.path.abspath(image)) if image else None
        return self.answer_records([record], folder, batch_size=1, **options)[0]


class Predictor(Asking):
    """Generation with a trained `VLMModule` and the DataModule that fed it (template, preprocessing).

    Args:
        module: the trained module (`inference.load.load_predictor` loads both from a run directory).
        datamodule: a DataModule of the run's config (not set up: only its encode and transform are used).
    """

    def __init__(self, module, datamodule) -> None:
        self.module = module
        self.datamodule = datamodule
        self.image_token = datamodule.image_token

    @torch.no_grad()
    def answer_records(
        self,
        records: list[dict],
        image_folder: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[str]:
        """The model's answer to the last human turn of each LLaVA-format record (a trailing gpt turn, the
        reference, is replaced by the model's answer). `should_stop` is asked before every batch; when it says
        so, `Interrupted` is raised (a pre-empted job stops scoring within one batch)."""
        dm = self.datamodule
        samples = []
        for index, record in enumerate(records):
            turns = list(record["conversations"])
            if turns and turns[-1].get("from") == "gpt":
                turns = turns[:-1]
            turns.append({"from": "gpt", "value": PLACEHOLDER_ANSWER})
            media = record.get("image") is not None or record.get("video") is not None
            samples.append(Sample(dict(record, conversations=turns), index, 0, media))
        dataset = LLaVADataset(
            samples, "(predict)", image_folder, dm.encode, dm.transform, dm.image_token_id, dm.image_tokens
        )
        module = self.module
        answers, training = [], module.training
        module.eval()  # no dropout; restored after, so a training-time evaluation leaves training as it was
        try:
            for start in range(0, len(dataset), batch_size):
                if should_stop is not None and should_stop():
                    raise Interrupted(f"stopped after {start} of {len(dataset)} records")
                answers += self._generate(dataset, start, batch_size, max_new_tokens, temperature, top_p)
        finally:
            module.train(training)
        return answers

    def _generate(self, dataset, start, batch_size, max_new_tokens, temperature, top_p) -> list[str]:
        """Answers to dataset items [start, start + batch_size)."""
        dm, module = self.datamodule, self.module
        pad = dm.tokenizer.pad_token_id
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad)
        pixels, sizes = batch["pixel_values"], batch.get("image_sizes")  # [K, 3, S, S]; [M, 2] with a tiling
        new_tokens = module.model.generate(
            batch["prompt_ids"].to(module.device),
            batch["prompt_mask"].to(module.device),
            None if pixels is None else pixels.to(module.device),
            max_new_tokens or module.evaluation.max_new_tokens,
            module.stop_ids,
            pad,
            temperature,
            top_p,
            image_sizes=sizes,  # which views are whose, and each image's token count (AnyRes)
        )
        return [module.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens]
