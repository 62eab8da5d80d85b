"""``memopt compress``: a plan of training stages from a fine-tuned teacher to a small deployable model."""

from lightning_memopt.compress.plan import FinalExport, Plan, PlanError, Stage, parse_plan, read_plan
from lightning_memopt.compress.runner import StageFailed, compress

__all__ = ["FinalExport", "Plan", "PlanError", "Stage", "StageFailed", "compress", "parse_plan", "read_plan"]
