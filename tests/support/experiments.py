"""The experiment YAMLs, for tests that parametrise over every experiment."""

from __future__ import annotations

import glob
import os

from experiment.config import EXPERIMENTS_DIR


def experiment_files() -> list[str]:
    """Every experiment YAML (bases and per-encoder fragments are not experiments on their own)."""
    files = glob.glob(os.path.join(EXPERIMENTS_DIR, "**", "*.yaml"), recursive=True)
    return sorted(f for f in files if os.path.basename(f) != "base.yaml" and "/encoders/" not in f)
