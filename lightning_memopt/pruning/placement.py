"""Full tensors for the mask math, and masks placed like their parameters (plain or FSDP2-sharded).

Under ``ModelParallelStrategy`` (FSDP2) parameters, their gradients and their optimizer states are
``DTensor`` shards. Scores and masks are computed on full tensors, identical on every rank, and each
mask is then sharded exactly like its parameter, so the in-place masking works on local shards.

Example:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.ones(2, 2))
    >>> place_like(torch.tensor([[True, False], [True, True]]), weight).dtype
    torch.bool
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank: gathered from the shards for a ``DTensor``, else itself (a collective)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def place_like(mask: Tensor, param: Tensor) -> Tensor:
    """``mask`` (full, the same on every rank) on ``param``'s device and sharded like it."""
    if isinstance(param, DTensor):
        return distribute_tensor(mask.to(param.device), param.device_mesh, param.placements)
    return mask.to(param.device)
