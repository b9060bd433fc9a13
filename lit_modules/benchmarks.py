"""Benchmark scores of a model on evaluation sets (`eval.sets` in the YAML), with the official metrics.

Each set is a local file (foundation/schema.py `EvalSetConfig`): records with a question, an optional image and
a `reference` in the form its metric takes (metrics/: the 10 human answers for
`vqa_accuracy`, the answer for `exact_match` / `pope`, `{"choices", "answer"}` for `multiple_choice`,
accepted answers for `anls`, captions for `cider`). The model answers every question through the run's
own template and preprocessing (`lit_modules.predictor.Predictor`); the metric scores the answers.
"""

from __future__ import annotations

import json
from typing import Callable

from datamodules.llava_data import DataError, load_records
from foundation.schema import EvalSetConfig
from lit_modules.predictor import Predictor
from metrics import METRICS


def read_set(eval_set: EvalSetConfig) -> list[dict]:
    """The set's records (JSON list or JSONL), checked for the fields evaluation needs."""
    if eval_set.file.endswith(".jsonl"):
        with open(eval_set.file, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        records = load_records(eval_set.file)
    for k, record in enumerate(records[: eval_set.max_samples]):
        missing = [key for key in ("question", "reference") if key not in record]
        if missing:
            raise DataError(f"{eval_set.file}: record {record.get('id', f'#{k}')!r}: no {', '.join(missing)}")
    return records[: eval_set.max_samples]


def evaluate_set(
    predictor: Predictor, eval_set: EvalSetConfig, image_token: str = "<image>", should_stop: Callable | None = None
) -> dict:
    """{metric key: score} of the predictor on one set, plus "predictions" (id -> answer). `should_stop`: see
    `Predictor.answer_records` (training-time scoring passes it; an exported predictor has none)."""
    records = read_set(eval_set)
    questions = [
        {
            "id": r.get("id", k),
            "image": r.get("image"),
            "conversations": [
                {
                    "from": "human",
                    "value": (f"{image_token}\n" if r.get("image") else "") + r["question"] + eval_set.prompt_suffix,
                }
            ],
        }
        for k, r in enumerate(records)
    ]
    stop = {} if should_stop is None else {"should_stop": should_stop}
    answers = predictor.answer_records(
        questions, eval_set.image_folder, eval_set.batch_size, max_new_tokens=eval_set.max_new_tokens, **stop
    )
    scores = METRICS.build(eval_set.metric, answers, [r["reference"] for r in records], **eval_set.options)
    return {**scores, "predictions": {str(q["id"]): a for q, a in zip(questions, answers)}}


def evaluate(
    predictor: Predictor, sets: list[EvalSetConfig], image_token: str = "<image>", should_stop: Callable | None = None
) -> dict[str, dict]:
    """{set name: {metric key: score, "predictions": ...}} for every set."""
    return {s.name: evaluate_set(predictor, s, image_token, should_stop) for s in sets}
