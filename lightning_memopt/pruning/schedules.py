"""Sparsity schedules as pure functions of the optimizer step.

The cubic schedule is Zhu & Gupta's gradual magnitude pruning ("To prune, or not to prune", 2017):

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3,   t in {t0, t0 + dt, ..., t0 + n * dt}

Sparsity rises quickly while there are many redundant weights and slowly near the target. It changes
only every ``dt`` steps (the update frequency) and holds ``s_f`` from ``t0 + n * dt`` on. Start, end
and frequency are given in optimizer steps (``int``) or as fractions of the run (``float`` in [0, 1]).

Example:
    >>> plan = SparsitySchedule(final_sparsity=0.8, kind="cubic", start=0, end=100, every=10)
    >>> run = plan.resolve(total_steps=200)
    >>> [round(sparsity_at(t, run), 3) for t in (0, 10, 50, 99, 100, 150)]
    [0.0, 0.217, 0.7, 0.799, 0.8, 0.8]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lightning_memopt.core.run_points import RunLength, check_point, resolve_point

ScheduleKind = Literal["constant", "linear", "cubic"]
KINDS: tuple[str, ...] = ("constant", "linear", "cubic")


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule with every position in optimizer steps, for one run of ``total_steps``."""

    kind: str
    initial_sparsity: float
    final_sparsity: float
    start_step: int
    end_step: int
    every_steps: int
    total_steps: int


@dataclass(frozen=True)
class SparsitySchedule:
    """How sparse the selected weights are at each optimizer step.

    Args:
        final_sparsity: the target fraction of zero weights, in [0, 1).
        kind: ``"cubic"`` (gradual magnitude pruning), ``"linear"``, or ``"constant"`` (the target from ``start`` on).
        initial_sparsity: the sparsity applied at ``start`` (``s_i``), at most ``final_sparsity``.
        start / end: where the ramp starts and reaches the target (steps, or fractions of the run).
        every: how often the sparsity is updated (steps, or a fraction of the run).
    """

    final_sparsity: float
    kind: ScheduleKind = "cubic"
    initial_sparsity: float = 0.0
    start: int | float = 0.0
    end: int | float = 0.7
    every: int | float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown schedule kind {self.kind!r}; choose one of {KINDS}.")
        for option in ("final_sparsity", "initial_sparsity"):
            value = getattr(self, option)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{option} must be in [0, 1) (a fraction of weights set to zero), got {value}.")
        for option in ("start", "end", "every"):
            check_point(option, getattr(self, option))
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity} is above final_sparsity={self.final_sparsity}; "
                "sparsity only grows during a run."
            )

    def resolve(self, total_steps: int) -> ResolvedSchedule:
        """Turn fractions into steps for a run of ``total_steps`` and check the schedule fits in it."""
        if total_steps < 1:
            raise ValueError(f"The run has {total_steps} optimizer steps; a schedule needs at least one.")
        length = RunLength(total_steps)
        start, end, every = (
            resolve_point(option, getattr(self, option), length) or 0 for option in ("start", "end", "every")
        )
        every = max(1, every)
        if self.kind != "constant" and end <= start:
            raise ValueError(f"The schedule ends at step {end}, not after its start at step {start}; move end later.")
        if max(start, end if self.kind != "constant" else start) > total_steps:
            raise ValueError(
                f"The schedule runs to step {max(start, end)} but the run has only {total_steps} optimizer steps; "
                "lower end (or start), or train longer."
            )
        return ResolvedSchedule(self.kind, self.initial_sparsity, self.final_sparsity, start, end, every, total_steps)


def sparsity_at(step: int, schedule: ResolvedSchedule) -> float:
    """The target sparsity at optimizer ``step`` (0 before the schedule starts)."""
    if step < schedule.start_step:
        return 0.0
    if schedule.kind == "constant" or step >= schedule.end_step:
        return schedule.final_sparsity
    updates = math.floor((step - schedule.start_step) / schedule.every_steps)
    progress = min(1.0, updates * schedule.every_steps / (schedule.end_step - schedule.start_step))
    s_i, s_f = schedule.initial_sparsity, schedule.final_sparsity
    if schedule.kind == "linear":
        return s_i + (s_f - s_i) * progress
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3
