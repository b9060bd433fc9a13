"""ANLS (DocVQA, InfographicVQA): Average Normalized Levenshtein Similarity with threshold 0.5.

The rule of the DocVQA / InfographicVQA evaluation script of the Robust Reading Competition
(docvqa.org), as shipped in QwenLM/Qwen-VL `eval_mm/infographicsvqa_eval.py::evaluate_method` and
restated by EvolvingLMMs-Lab/lmms-eval `lmms_eval/api/metrics.py::anls`: per accepted answer, both
sides are lower-cased with runs of whitespace collapsed and the ends stripped; the character
Levenshtein distance of those is divided by the longer of the two *unnormalised* strings' lengths (an
official quirk; an empty pair has ratio 0). The question's score is 1 - the smallest ratio, set to 0
when it is below the threshold (a similarity of exactly 0.5 is kept).
"""

from __future__ import annotations

from metrics.common import check_lengths, mean


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls_score(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """One question's ANLS in [0, 1] against its accepted answers."""
    if not answers:
        raise ValueError("an ANLS question needs at least one answer")
    ratios = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        ratios.append(levenshtein(_collapse(answer), _collapse(prediction)) / length if length else 0.0)
    score = 1.0 - min(ratios)
    return 0.0 if score < threshold else score


def anls(predictions: list[str], references: list[list[str]], threshold: float = 0.5) -> dict[str, float]:
    """Mean ANLS.

    Args:
        predictions: one generated answer per question.
        references: per question, the list of accepted answers.
        threshold: similarities below it score 0 (0.5 in DocVQA / InfographicVQA).
    """
    check_lengths(predictions, references)
    return {"anls": mean([anls_score(p, r, threshold) for p, r in zip(predictions, references)])}
