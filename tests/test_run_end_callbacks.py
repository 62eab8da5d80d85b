"""MetricsSummary prints the final metrics with the step the weights were trained to; the CLI adds it once."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONLL_LABELS, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_memopt import MetricsSummary, TokenClassificationDataModule, TokenClassificationModule, ValidateFinalStep


def test_validate_prints_the_checkpoints_step_and_no_fit_lines(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = TokenClassificationDataModule(
        train_file=str(conll_small["train"]), val_file=str(conll_small["val"]), batch_size=16
    )
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, monitor="val_f1", mode="max")
    fit = quiet_trainer(max_steps=3, limit_val_batches=2, callbacks=[checkpoint, ValidateFinalStep(), MetricsSummary()])
    fit.fit(module, datamodule=data)
    fitted = capsys.readouterr().out
    assert "Final validation metrics (step 3):" in fitted and "Best checkpoint:" in fitted

    fresh = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    quiet_trainer(limit_val_batches=2, callbacks=[MetricsSummary()]).validate(
        fresh, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt")
    )
    validated = capsys.readouterr().out
    assert "Validation metrics (step 3):" in validated and "val_f1" in validated
    assert "Best checkpoint" not in validated and "Final" not in validated
