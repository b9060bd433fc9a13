"""Helpers shared by the metric families."""

from __future__ import annotations

from typing import Sequence


def check_lengths(predictions: Sequence, references: Sequence) -> None:
    """ValueError unless there is one reference per prediction."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def mean(values: Sequence[float]) -> float:
    """The mean, 0.0 for no values (an empty split scores 0, it does not raise)."""
    return sum(values) / len(values) if values else 0.0
