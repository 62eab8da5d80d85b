"""Tests for the outside example project ``examples/plain_lightning`` (a user's own Lightning code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from helpers import EXAMPLE, SHARED_DATA, load_example, quiet_trainer

DATA = SHARED_DATA
TRAIN_FILE = DATA / "sst2" / "train.tsv.gz"
DEV_FILE = DATA / "sst2" / "dev.tsv.gz"

needs_data = pytest.mark.skipif(
    not TRAIN_FILE.exists() or not DEV_FILE.exists(),
    reason=f"SST-2 data not found under {DATA / 'sst2'} (shared data folder missing)",
)


class StepRecorder(lightning.Callback):
    """Record every training step's loss and the type of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batch_types: set[type] = set()

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        self.batch_types.add(type(batch))


@needs_data
def test_tiny_model_trains_on_sst2_tuples() -> None:
    sentiment = load_example()
    lightning.seed_everything(0)
    model = sentiment.TinySentimentModel(hidden_size=32, num_layers=2, num_heads=2)
    data = sentiment.SST2Tuples(train_file=str(TRAIN_FILE), val_file=str(DEV_FILE), max_train_rows=200, batch_size=32)
    recorder = StepRecorder()
    trainer = quiet_trainer(max_steps=30, enable_checkpointing=False, callbacks=[recorder])
    trainer.fit(model, datamodule=data)

    assert len(data.train_set) == 200
    assert recorder.batch_types == {tuple}
    assert len(recorder.losses) == 30
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first, f"training loss did not go down: first 5 mean {first:.4f}, last 5 mean {last:.4f}"
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0

    input_ids, attention_mask, labels = next(iter(data.train_dataloader()))
    assert input_ids.shape == attention_mask.shape and input_ids.dtype == torch.long
    assert input_ids.shape[1] <= 64 and labels.shape == (input_ids.shape[0],)
    assert int(attention_mask.sum(dim=1).max()) == input_ids.shape[1]  # dynamic padding: longest row fits


@needs_data
def test_cli_entry_point_runs(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "fit",
        "--data.train_file",
        str(TRAIN_FILE),
        "--data.val_file",
        str(DEV_FILE),
        "--data.max_train_rows",
        "200",
        "--model.hidden_size",
        "32",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in this process (conftest.one_torch_thread)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").exists()


def test_the_example_module_with_its_own_head_exports_to_onnx_as_its_readme_shows(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")
    pytest.importorskip("onnxscript", reason="the deploy extra is not installed")
    import json

    from transformers import AutoTokenizer

    from lightning_memopt import export_model

    sentiment = load_example()
    torch.manual_seed(0)
    model = sentiment.TinySentimentModel(hidden_size=32, num_layers=2, num_heads=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(sentiment.default_tokenizer_dir())
    export_model(model, tmp_path / "onnx", tokenizer, format="onnx", labels=["negative", "positive"])
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["labels"] == ["negative", "positive"]
    assert (tmp_path / "onnx" / "model.onnx").exists() and (tmp_path / "onnx" / "tokenizer.json").exists()
