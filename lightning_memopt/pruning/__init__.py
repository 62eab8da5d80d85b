"""Pruning: sparsity schedules and mask math (pure functions), layer selection, and the callback."""

from lightning_memopt.core.filters import default_filter, pattern_filter, select_weights
from lightning_memopt.core.sparse_format import SparseReport, load_sparse, save_sparse
from lightning_memopt.pruning.callback import PruningScheduler
from lightning_memopt.pruning.masks import global_masks, layerwise_masks, mask_sparsity
from lightning_memopt.pruning.schedules import ResolvedSchedule, SparsitySchedule, sparsity_at
from lightning_memopt.pruning.structured import ShrinkReport, shrink_pruned
from lightning_memopt.pruning.units import AttentionLayout, FFNLayout, UnitGroup, find_unit_groups, register_layout

__all__ = [
    "AttentionLayout",
    "FFNLayout",
    "PruningScheduler",
    "ResolvedSchedule",
    "ShrinkReport",
    "SparseReport",
    "SparsitySchedule",
    "UnitGroup",
    "default_filter",
    "find_unit_groups",
    "global_masks",
    "layerwise_masks",
    "load_sparse",
    "mask_sparsity",
    "pattern_filter",
    "register_layout",
    "save_sparse",
    "select_weights",
    "shrink_pruned",
    "sparsity_at",
]
