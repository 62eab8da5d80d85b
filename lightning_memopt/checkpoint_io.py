"""Checkpoint writing that never leaves a half-written file behind.

Lightning's default ``TorchCheckpointIO`` writes straight to the destination, so a run killed while
saving can leave a truncated ``last.ckpt`` that ``--ckpt_path last`` then fails to load. This plugin
writes to a temporary file in the same folder, flushes it to disk, and renames it over the target
(``os.replace`` is atomic on POSIX and Windows).

Example (recipe YAML)::

    trainer:
      plugins:
        - class_path: lightning_memopt.AtomicCheckpointIO
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing and whose loads never unpickle code.

    Loading defaults to ``weights_only=True`` for local and remote (``https://``) paths alike;
    Lightning's own default is ``False`` for remote checkpoints.
    """

    @override
    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}.")
        if get_filesystem(path).protocol not in ("file", ("file", "local")) and "://" in str(path):
            super().save_checkpoint(checkpoint, path)  # remote stores: their own upload semantics
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~_current_umask())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
