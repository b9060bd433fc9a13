"""Callbacks for what is not a training step: throughput and FLOPs, learning rates, validation samples,
the run summary and the console report."""

from lit_modules.callbacks.console import ConsoleReport
from lit_modules.callbacks.learning_rates import LearningRates
from lit_modules.callbacks.run_summary import RunSummary
from lit_modules.callbacks.throughput import StepThroughput, ThroughputRates
from lit_modules.callbacks.validation_samples import ValidationSamples

__all__ = ["ConsoleReport", "LearningRates", "RunSummary", "StepThroughput", "ThroughputRates", "ValidationSamples"]
