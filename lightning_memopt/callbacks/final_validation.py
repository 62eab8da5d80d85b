"""``ValidateFinalStep``: the run's last training step is validated, so final metrics describe ``last.ckpt``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class ValidateFinalStep(Callback):
    """Validate the run's last training step, so that "final" metrics and ``last.ckpt`` describe the same weights.

    Lightning validates every ``val_check_batch`` batches (``val_check_interval: 0.25`` means every
    ``int(0.25 * batches)``) and skips an epoch's last batch when that count does not divide it: a
    2,105-batch SST-2 epoch is validated after batch 2,104 and ends one optimizer step later. For a
    float model that step changes nothing visible; for a fake-quantized one it moved 2 and 9 of 872
    SST-2 predictions. On the run's last batch (``max_steps`` reached, or the last batch of the last
    epoch) this sets ``trainer.should_stop``, which makes Lightning validate that batch as it does
    for early stopping; a run whose schedule validates there anyway is unchanged. Runs that end by
    ``max_time``, or whose last epoch is not a validation epoch (``check_val_every_n_epoch``), are left
    as Lightning runs them.
    """

    def __init__(self) -> None:
        self.minimums: tuple[int | None, int | None] | None = None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loop = trainer.fit_loop
        steps_done = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.should_stop or not (steps_done or (last_epoch and loop.epoch_loop.batch_progress.is_last_batch)):
            return
        # No batch follows this one, so min_epochs/min_steps are met in substance; Lightning counts the
        # current epoch only once it ends, and would refuse to stop "early" without this.
        self.minimums = (loop.min_epochs, loop.epoch_loop.min_steps)
        loop.min_epochs, loop.epoch_loop.min_steps = 0, None
        trainer.should_stop = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.minimums is not None:  # a second fit on this Trainer keeps the user's minimums
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = self.minimums
            self.minimums = None
