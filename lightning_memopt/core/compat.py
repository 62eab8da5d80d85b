"""The one place that touches private or version-specific APIs of torch, transformers and Lightning.

Everything else in the package imports these names from here, so that a change upstream is one edit.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def load_dcp_state(state: dict[str, Any], storage_reader: Any, planner: Any) -> None:
    """torch's single-process DCP load that fills an empty ``state`` (what ``dcp_to_torch_save`` runs).

    The public ``torch.distributed.checkpoint.load`` copies back only the keys ``state`` already has.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state, storage_reader=storage_reader, planner=planner, no_dist=True)


def last_checkpoints(trainer: Any) -> set[str]:
    """The ``last.ckpt`` paths Lightning would pick from for ``ckpt_path="last"`` (its ModelCheckpoint's own search)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    found: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= {str(path) for path in callback._find_last_checkpoints(trainer)}
    return found


def legacy_int8_kernel() -> bool:
    """Whether PyTorch still ships its legacy dynamic int8 Linear kernel (and the quantized tensors it packs)."""
    try:
        return hasattr(torch, "_make_per_channel_quantized_tensor") and torch.ops.quantized.linear_dynamic is not None
    except (AttributeError, RuntimeError):
        return False


def pack_int8_linear(weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> object:
    """Pack int8 weights (one scale per output row) for PyTorch's legacy dynamic int8 Linear kernel.

    That kernel (``torch.ops.quantized``, with ``torch.ao``'s quantized tensors) is being deprecated
    (pytorch/pytorch#184982); its notice is silenced here, the one place that uses it.
    """
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        qweight = torch._make_per_channel_quantized_tensor(weight, scales.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def int8_linear_dynamic(x: torch.Tensor, packed: object, reduce_range: bool) -> torch.Tensor:
    """``x @ W.T + b`` by the legacy kernel: activations quantized per tensor at run time, int8 GEMM."""
    return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)


def checkpoint_activations(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass (torch's composable ``checkpoint``), once.

    The composable API (``torch.distributed._composable``) keeps full-checkpoint resume working where
    ``checkpoint_wrapper`` renames parameters.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed._composable.contract import _get_registry

    if "checkpoint" not in (_get_registry(module) or {}):
        checkpoint(module)


def mem_tracker_class() -> type:
    """PyTorch's ``MemTracker`` (``torch.distributed._tools``, torch >= 2.5), which ``memopt estimate`` runs on."""
    from torch.distributed._tools.mem_tracker import MemTracker

    return MemTracker


def fsdp1_checkpointing_options(block_classes: set[type]) -> dict:
    """Lightning's options for checkpointing FSDP1-wrapped blocks of ``block_classes`` (a private fabric helper)."""
    from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs

    return _activation_checkpointing_kwargs(None, block_classes)


def fsdp1_apply_checkpointing(model: torch.nn.Module, options: dict) -> None:
    """Apply those options to an FSDP1-wrapped model, as Lightning's FSDPStrategy does (a private fabric helper)."""
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

    _setup_activation_checkpointing(model, options)


def dcp_storage_info_class() -> type:
    """The per-shard storage record torch pickles into DCP's ``.metadata`` (a private class of its reader)."""
    from torch.distributed.checkpoint import filesystem

    return filesystem._StorageInfo


def dcp_gathering_planner_class() -> type:
    """torch's planner that rebuilds a whole state dict from DCP metadata (what ``dcp_to_torch_save`` uses)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    return _EmptyStateDictLoadPlanner
