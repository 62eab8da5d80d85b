"""When a technique acts: one run point type for start, end and frequency, shared by pruning, KD and QAT.

A point is an optimizer step (``int``), a number of epochs (``int`` with ``unit="epochs"``) or a
fraction of the run (``float`` in [0, 1]). It is checked when the callback is built (:func:`check_point`)
and turned into a step once the trainer knows the run's length (:func:`resolve_point` with
:func:`run_length`).

Example:
    >>> length = RunLength(total_steps=400, steps_per_epoch=100)
    >>> resolve_point("start", 0.25, length), resolve_point("start", 2, length, unit="epochs")
    (100, 200)
    >>> linear_ramp(0.9, 0.1, step=50, total_steps=100)
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Unit = Literal["steps", "epochs"]
UNITS: tuple[str, ...] = ("steps", "epochs")
RunPoint = int | float


@dataclass(frozen=True)
class RunLength:
    """How long a run is in optimizer steps, and how many of them one epoch holds."""

    total_steps: int
    steps_per_epoch: int = 1


def run_length(trainer: Any) -> RunLength:
    """The length of ``trainer``'s run (``estimated_stepping_batches``; an epoch's batches / accumulation)."""
    batches = trainer.num_training_batches  # inf for an iterable without a length: epochs are then unknown
    per_epoch = int(batches) // max(1, trainer.accumulate_grad_batches) if math.isfinite(batches) else 1
    return RunLength(int(trainer.estimated_stepping_batches), max(1, per_epoch))


def check_point(option: str, value: RunPoint | None, unit: Unit = "steps") -> None:
    """Refuse a point no run could have (negative, a boolean, a fraction outside [0, 1], an unknown unit)."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(
            f"{option} must be a step (int >= 0) or a fraction of the run (float in [0, 1]), got {value!r}."
        )
    if isinstance(value, float) and value > 1:
        raise ValueError(
            f"{option}={value}: a float is a fraction of the run and must be in [0, 1] (this is a float above 1; "
            "give a step as an int)."
        )


def resolve_point(option: str, value: RunPoint | None, length: RunLength, unit: Unit = "steps") -> int | None:
    """The optimizer step ``value`` names in a run of ``length`` (``None`` stays ``None``)."""
    check_point(option, value, unit)
    if value is None:
        return None
    if isinstance(value, float):
        return round(value * length.total_steps)
    return value * length.steps_per_epoch if unit == "epochs" else int(value)


def linear_ramp(start: float, end: float | None, step: int, total_steps: int) -> float:
    """``start`` moved linearly to ``end`` over ``total_steps`` (``start`` throughout when ``end`` is None)."""
    if end is None or total_steps <= 0:
        return start
    return start + (end - start) * min(step, total_steps) / total_steps
