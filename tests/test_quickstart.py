"""The README's promise: `python train.py` trains the quickstart to >= 0.9 held-out exact match.

Slow (about 5 minutes on 2 CPU cores), and run in CI because the README makes the promise. The time
limit is checked by reading the wall time this test prints, not by the test (timings vary by machine).
"""

from __future__ import annotations

import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train import main


@pytest.mark.slow
def test_quickstart_reaches_90_percent_exact_match(tmp_path):
    start = time.perf_counter()
    trainer = main(
        [
            f"data.builtin.root={tmp_path / 'shapes'}",
            f"logging.root={tmp_path / 'runs'}",
            "trainer.enable_progress_bar=false",
        ]
    )
    minutes = (time.perf_counter() - start) / 60
    ea = EventAccumulator(trainer.logger.log_dir)
    ea.Reload()
    accuracy = [e.value for e in ea.Scalars("val/exact_match")]
    print(f"quickstart: {minutes:.1f} min, held-out exact match per validation: {accuracy}")
    assert accuracy[-1] >= 0.9
