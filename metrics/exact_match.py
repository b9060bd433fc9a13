"""Exact-match accuracy (GQA).

The official GQA `eval.py` (testdev balanced) scores `predicted == gold` on raw strings; what makes
LLaVA-style generations comparable is the prediction clean-up LLaVA applies before it:
`scripts/convert_gqa_for_eval.py` writes `text.rstrip('.').lower()` (haotian-liu/LLaVA), and
`llava/eval/model_vqa_loader.py` has already stripped the generation's surrounding whitespace.
Gold answers are compared as given (GQA's are lower-case words without final periods).
"""

from __future__ import annotations

from metrics.common import check_lengths, mean

NORMALIZERS = ("gqa", "none")


def gqa_normalize(prediction: str) -> str:
    """LLaVA's GQA submission clean-up: strip whitespace, drop trailing periods, lower-case."""
    return prediction.strip().rstrip(".").lower()


def exact_match(predictions: list[str], references: list[str], normalize: str = "gqa") -> dict[str, float]:
    """Fraction of predictions equal to their reference.

    Args:
        predictions: one generated answer per question.
        references: the gold answer string per question.
        normalize: "gqa" (LLaVA's clean-up of the prediction, see the module docstring) or "none"
            (the raw comparison of the official `eval.py`).
    """
    if normalize not in NORMALIZERS:
        raise ValueError(f"unknown normalize {normalize!r}; choose one of: {', '.join(NORMALIZERS)}")
    check_lengths(predictions, references)
    clean = gqa_normalize if normalize == "gqa" else (lambda text: text)
    return {"accuracy": mean([float(clean(p) == r) for p, r in zip(predictions, references)])}
