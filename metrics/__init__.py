"""Benchmark metrics equal to the official scoring code, found by name in `METRICS`.

Every entry is `fn(predictions: list[str], references: list[...], **options) -> dict[str, float]`
with scores in [0, 1] (CIDEr: its own scale, COCO tables print it x100). References per metric:

| name | reference per prediction | module (official code it restates) |
|---|---|---|
| vqa_accuracy | the human answers (10) | vqa.py (VQA / TextVQA / VizWiz evaluators) |
| exact_match | the gold answer string | exact_match.py (GQA eval.py + LLaVA's clean-up) |
| multiple_choice | {"choices": [...], "answer": index or letter, "group"?} | choice.py (LLaVA ScienceQA, MMBench) |
| pope | "yes" or "no" | pope.py (LLaVA eval_pope.py) |
| anls | the accepted answers | anls.py (DocVQA / InfographicVQA ANLS) |
| cider | the reference captions | caption.py (pycocoevalcap CIDEr-D) |
"""

from __future__ import annotations

from foundation.registry import Registry
from metrics.anls import anls
from metrics.caption import cider
from metrics.choice import multiple_choice
from metrics.exact_match import exact_match
from metrics.pope import pope
from metrics.vqa import vqa_accuracy

METRICS = Registry("metric", inputs=("predictions", "references"))
METRICS.register("vqa_accuracy", vqa_accuracy)
METRICS.register("exact_match", exact_match)
METRICS.register("multiple_choice", multiple_choice)
METRICS.register("pope", pope)
METRICS.register("anls", anls)
METRICS.register("cider", cider)

__all__ = ["METRICS", "anls", "cider", "exact_match", "multiple_choice", "pope", "vqa_accuracy"]
