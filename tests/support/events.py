"""Reading what a run wrote to TensorBoard."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: str, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar of a run directory."""
    ea = EventAccumulator(run_dir)
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}
