"""``MetricsSummary``: a table of the final metrics when fit, validate or test ends, and the best checkpoint.

Example:
    >>> print(format_metrics({"val_f1": 0.9123}, "Validation"))
    Validation
      val_f1  0.9123
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

TITLES = {"fit": "Final validation metrics", "validate": "Validation metrics", "test": "Test metrics"}
PREFIXES = {"fit": "val_", "validate": "val_", "test": "test_"}


def format_metrics(metrics: dict[str, float], title: str) -> str:
    """A small aligned table of metric values."""
    width = max(len(name) for name in metrics)
    rows = [f"  {name:<{width}}  {value:.4f}" for name, value in sorted(metrics.items())]
    return "\n".join([title, *rows])


def scalar_metrics(callback_metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The logged scalars whose names start with ``prefix``."""
    return {
        name: float(value)
        for name, value in callback_metrics.items()
        if name.startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1
    }


class MetricsSummary(Callback):
    """Print the run's final metrics (``val_*`` after fit and validate, ``test_*`` after test) as a table.

    The step shown is the one the weights were trained to: the fit's last step, or for validate and
    test the step of the checkpoint they loaded. After fit, the best checkpoint's path follows.
    """

    def __init__(self) -> None:
        self.checkpoint_step: int | None = None

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_step = checkpoint.get("global_step")

    @override
    @rank_zero_only
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in TITLES:
            return
        step = trainer.global_step if stage == "fit" or self.checkpoint_step is None else self.checkpoint_step
        metrics = scalar_metrics(trainer.callback_metrics, PREFIXES[stage])
        if metrics:
            print(format_metrics(metrics, f"{TITLES[stage]} (step {step}):"), flush=True)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if stage == "fit" and best:
            print(f"Best checkpoint: {best}", flush=True)
        self.checkpoint_step = None
