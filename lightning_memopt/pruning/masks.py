"""Masks from importance scores: keep the highest-scoring weights, per layer or across layers.

Pure tensor functions. A mask is a bool tensor shaped like its weight (``True`` = kept). The number of
pruned weights is exact (``round(sparsity * numel)``), ties broken by position, so the requested
sparsity is what is reached.

Example:
    >>> import torch
    >>> scores = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.2]]), "b": torch.tensor([3.0, 0.05])}
    >>> layerwise_masks(scores, 0.5)["a"].tolist()
    [[False, True], [True, False]]
    >>> global_masks(scores, 0.5)["b"].tolist()
    [True, False]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")


def _keep_top(flat_scores: Tensor, sparsity: float) -> Tensor:
    """A flat bool mask dropping the ``round(sparsity * n)`` lowest scores (stable order on ties)."""
    pruned = round(sparsity * flat_scores.numel())
    keep = torch.ones_like(flat_scores, dtype=torch.bool)
    if pruned:
        order = torch.argsort(flat_scores.float(), stable=True)
        keep[order[:pruned]] = False
    return keep


def layerwise_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Each layer loses the same fraction of its weights: its lowest-scoring ones."""
    _check_sparsity(sparsity)
    return {name: _keep_top(score.reshape(-1), sparsity).reshape(score.shape) for name, score in scores.items()}


def global_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """The lowest-scoring weights across all layers are pruned; layers end up with different sparsities."""
    _check_sparsity(sparsity)
    if not scores:
        return {}
    flat = torch.cat([score.reshape(-1).float() for score in scores.values()])
    keep = _keep_top(flat, sparsity)
    masks, offset = {}, 0
    for name, score in scores.items():
        masks[name] = keep[offset : offset + score.numel()].reshape(score.shape)
        offset += score.numel()
    return masks


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """The fraction of pruned entries over all masks."""
    total = sum(mask.numel() for mask in masks.values())
    return 0.0 if total == 0 else sum(int((~mask).sum()) for mask in masks.values()) / total
