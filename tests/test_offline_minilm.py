"""The README's main job on a small slice: the offline recipe loads the real pretrained MiniLM and learns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT

from lightning_memopt.cli import run_cli


@pytest.mark.slow
def test_offline_ner_recipe_with_pretrained_minilm(
    conll_small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", ["memopt"])
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(PROJECT_ROOT / "recipes/ner/conll2003.yaml"),
            "--config",
            str(PROJECT_ROOT / "recipes/ner/conll2003-offline.yaml"),
            "--config",
            str(PROJECT_ROOT / "recipes/budgets/600-steps.yaml"),
            f"--data.train_file={conll_small['train']}",
            f"--data.val_file={conll_small['val']}",
            "--trainer.max_steps=25",
            "--trainer.val_check_interval=25",
            "--model.learning_rate=3e-4",
            "--data.batch_size=16",
            "--trainer.enable_progress_bar=false",
        ]
    )
    model = cli.model.model
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6  # the real MiniLM-L6
    assert "Final validation metrics (step 25)" in capsys.readouterr().out
    # 25 steps on 160 sentences from pretrained weights already find entities; random init would not.
    assert float(cli.trainer.callback_metrics["val_f1"]) > 0.1  # seeded run: 0.19
