"""``memopt fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI for any LightningModule and DataModule.

Besides Lightning's own options it has two optional checkpoint sections, ``checkpoint`` (the best
model by a validation metric) and ``last_checkpoint`` (a resumable ``last.ckpt`` every N steps), so
that recipes configure checkpointing apart from ``trainer.callbacks``, which compression overlays
extend with ``callbacks+:``. The run-end callbacks of :mod:`lightning_memopt.callbacks` are added to
every Trainer it builds, and ``--ckpt_path`` is checked to hold nothing but data before it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_memopt.callbacks import FinalLastCheckpoint, MetricsSummary, ValidateFinalStep
from lightning_memopt.core.checkpoints import verify_checkpoint
from lightning_memopt.core.compat import last_checkpoints

DESCRIPTION = (
    "memopt: fit, validate or test with a recipe (memopt fit --config recipes/ner/conll2003.yaml); "
    "`memopt export --help` writes a checkpoint as a folder plain transformers loads; "
    "`memopt student --help` makes a smaller student from a teacher's layers; "
    "`memopt estimate --config ... [--device_memory 16GiB]` predicts per-device peak training memory."
)
STRATEGY_HINT = (
    "lightning_memopt's presets are recipe overlays: --config recipes/strategies/<name>.yaml with <name> one of "
    "single-device, ddp, multi-node, fsdp1, fsdp2, zero1, zero2, zero3 (or the class paths "
    "lightning_memopt.FSDP1Strategy, lightning_memopt.FSDP2Strategy, lightning_memopt.ZeROStrategy)."
)
RUN_END_CALLBACKS = (ValidateFinalStep, FinalLastCheckpoint, MetricsSummary)


class MemoptCLI(LightningCLI):
    """LightningCLI that takes any LightningModule / LightningDataModule and reports final metrics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("checkpoint", "last_checkpoint"):
            parser.add_lightning_class_args(ModelCheckpoint, key, subclass_mode=True, required=False)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning adds every callback section to the Trainer; leave out the sections a config omits."""
        parser = self._parser(self.subcommand)
        all_keys = parser.callback_keys
        parser.callback_keys = [key for key in all_keys if self._get(self.config_init, key) is not None]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as error:
            if "invalid strategy name" not in str(error):
                raise
            raise ValueError(f"{error}\n{STRATEGY_HINT}") from None
        finally:
            parser.callback_keys = all_keys
        present = {type(callback) for callback in trainer.callbacks}
        trainer.callbacks += [kind() for kind in RUN_END_CALLBACKS if kind not in present]
        return trainer

    def before_fit(self) -> None:
        self._verify_ckpt_path()

    def before_validate(self) -> None:
        self._verify_ckpt_path()

    def before_test(self) -> None:
        self._verify_ckpt_path()

    def before_predict(self) -> None:
        self._verify_ckpt_path()

    def _verify_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning or DeepSpeed read it with loaders that would run pickled code."""
        given = self.config_init[self.subcommand].get("ckpt_path")
        if given in (None, "best", "hpc") or (isinstance(given, str) and given.startswith("registry:")):
            return
        paths = sorted(last_checkpoints(self.trainer)) if given == "last" else [given]
        for path in paths:
            if "://" in str(path):
                continue  # remote: AtomicCheckpointIO loads it weights-only
            if not Path(path).exists():
                raise FileNotFoundError(f"--ckpt_path {path}: no such file or folder.")
            verify_checkpoint(path)


def run_cli(args: list[str] | None = None, **cli_kwargs: Any) -> MemoptCLI:
    """Run the LightningCLI part of ``memopt`` (``fit``, ``validate``, ``test``, ``predict``).

    Extra keyword arguments go to :class:`LightningCLI` (e.g. ``trainer_defaults={"callbacks": [...]}``).
    """
    return MemoptCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        **cli_kwargs,
    )
