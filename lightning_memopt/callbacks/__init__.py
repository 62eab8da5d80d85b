"""Run-end callbacks every run wants, whatever its techniques: the CLI adds them, Python users add them too.

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(callbacks=[MetricsSummary(), ValidateFinalStep(), FinalLastCheckpoint()])  # doctest: +SKIP
"""

from lightning_memopt.callbacks.final_checkpoint import FinalLastCheckpoint
from lightning_memopt.callbacks.final_validation import ValidateFinalStep
from lightning_memopt.callbacks.metrics_summary import MetricsSummary, format_metrics

__all__ = ["FinalLastCheckpoint", "MetricsSummary", "ValidateFinalStep", "format_metrics"]
