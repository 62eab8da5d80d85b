"""Pruning: sparsity schedules and mask math (pure functions). The callback comes next (issue #3)."""

from lightning_memopt.pruning.masks import global_masks, layerwise_masks, mask_sparsity
from lightning_memopt.pruning.schedules import ResolvedSchedule, SparsitySchedule, sparsity_at

__all__ = ["ResolvedSchedule", "SparsitySchedule", "global_masks", "layerwise_masks", "mask_sparsity", "sparsity_at"]
