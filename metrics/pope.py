"""POPE: yes/no accuracy, precision, recall, F1 and yes-ratio, as haotian-liu/LLaVA
`llava/eval/eval_pope.py::eval_pope` computes them ("yes" is the positive class).

Reply parsing there: keep the text before the first "." (the first sentence), delete commas, split
on single spaces; the reply is "no" when one of the words is exactly "No", "no" or "not", otherwise
"yes" (so "NO" and "Not" read as yes, and an empty reply is yes). A label is negative only when it is
exactly "no". The official script divides by zero when no reply is "yes" (precision) or nothing is
right (F1); here those ratios are 0.0.
"""

from __future__ import annotations

from metrics.common import check_lengths

_NEGATIVE_WORDS = ("No", "not", "no")


def parse_yes_no(reply: str) -> str:
    """The "yes" / "no" that LLaVA's POPE evaluation reads from `reply`."""
    first_sentence = reply.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(w in words for w in _NEGATIVE_WORDS) else "yes"


def _ratio(num: int, den: int | float) -> float:
    return num / den if den else 0.0


def pope(predictions: list[str], references: list[str]) -> dict[str, float]:
    """POPE metrics in [0, 1].

    Args:
        predictions: the generated replies.
        references: "yes" or "no" per question (anything other than "no" counts as yes, as officially).
    """
    check_lengths(predictions, references)
    preds = [parse_yes_no(p) == "yes" for p in predictions]
    labels = [r != "no" for r in references]
    tp = sum(p and t for p, t in zip(preds, labels))
    fp = sum(p and not t for p, t in zip(preds, labels))
    tn = sum(not p and not t for p, t in zip(preds, labels))
    fn = sum(not p and t for p, t in zip(preds, labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(preds)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(preds), len(preds)),
    }
