"""The one place that touches private or version-specific APIs of torch, transformers and Lightning.

Everything else in the package imports these names from here, so that a change upstream is one edit.
"""

from __future__ import annotations

from typing import Any


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
