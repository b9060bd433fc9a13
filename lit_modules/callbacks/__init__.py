"""The Lightning callbacks of a run: checkpoints, benchmark scores, throughput and FLOPs, learning rates,
validation samples, the run summary and the console report."""

from lit_modules.callbacks.benchmarks import Benchmarks
from lit_modules.callbacks.checkpointing import BestCheckpoints, LastCheckpoint
from lit_modules.callbacks.console import ConsoleReport
from lit_modules.callbacks.learning_rates import LearningRates
from lit_modules.callbacks.run_summary import RunSummary
from lit_modules.callbacks.throughput import StepThroughput, ThroughputRates
from lit_modules.callbacks.validation_samples import ValidationSamples

__all__ = [
    "Benchmarks",
    "BestCheckpoints",
    "ConsoleReport",
    "LastCheckpoint",
    "LearningRates",
    "RunSummary",
    "StepThroughput",
    "ThroughputRates",
    "ValidationSamples",
]
