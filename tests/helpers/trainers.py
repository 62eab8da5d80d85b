"""Trainers for tests: quiet CPU trainers, a kill switch, one short NER fit, and a stand-in trainer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.paths import CONLL_LABELS


def quiet_trainer(**options: Any) -> Trainer:
    """A CPU Trainer without logger, progress bar or model summary; ``options`` add to or override these."""
    defaults = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(**{**defaults, **options})


class Interrupt(Callback):
    """Kill the run (as a pre-empted job would be killed) after a given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SystemExit("killed")


def fit_tiny_ner(
    tiny_bert_dir: Path,
    train_file: Path,
    root: Path,
    callbacks: list[Callback],
    max_steps: int,
    save_every: int,
    ckpt_path: str | None = None,
) -> tuple[Any, Trainer]:
    """Train the tiny BERT on a CoNLL file (batch 16), writing ``root/last.ckpt`` every ``save_every`` steps."""
    from lightning_memopt import AtomicCheckpointIO, TokenClassificationDataModule, TokenClassificationModule

    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3)
    data = TokenClassificationDataModule(train_file=str(train_file), batch_size=16)
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=True, every_n_train_steps=save_every)
    trainer = quiet_trainer(
        max_steps=max_steps,
        max_epochs=100,  # as in the recipes: Lightning then builds the training loader before it restores
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
        callbacks=[checkpoint, *callbacks],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def fake_trainer(strategy: Any = None, **attributes: Any) -> SimpleNamespace:
    """Just enough of a Trainer for checks that read ``trainer.strategy`` (and the given attributes)."""
    return SimpleNamespace(strategy=strategy, **attributes)
