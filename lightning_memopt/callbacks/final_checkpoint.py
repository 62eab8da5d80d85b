"""``FinalLastCheckpoint``: every ``last.ckpt`` holds the end-of-training state."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class FinalLastCheckpoint(Callback):
    """Make every ``last.ckpt`` hold the end-of-training state (a distillation teacher, an export source).

    Lightning writes ``last.ckpt`` only at its save steps, so a run that ends between two of them would
    leave an older one behind, and one saved at the last step before the final validation would lack
    that validation's best score. Saved in ``on_train_end``, while sharded strategies can still gather.
    """

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path, weights_only=False)
                callback.last_model_path = str(path)
